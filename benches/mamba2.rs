//! CPU benchmark of the Mamba-2 mixer at the Phi-2 hybrid's shape (d_model 2560, 32 heads x 80,
//! d_state 80, 32 groups, d_conv 4, chunk 256), batch 1, f32: chunked prefill against the
//! sequential recurrence, the scan alone, and decoding. Prints a table.
//!
//! Run: `cargo bench --bench mamba2` (release). `MAMBA2_BENCH_LENS=256,1024` picks the lengths,
//! `MAMBA2_BENCH_NAIVE_MAX=1024` the longest length the slow naive paths are timed at.
//!
//! Both wall time and process CPU time (all threads, from /proc/self/stat) are reported: on a
//! machine shared with other jobs the wall time swings with their load, while the CPU time
//! measures the work done, so the growth with L is judged on CPU time. `RAYON_NUM_THREADS=1`
//! runs it on one thread (candle's worker threads spin between small ops, which on a busy
//! 2-core machine can cost more than they bring).

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use matvlm::model::mamba2::{naive, ssd, Mamba2, Mamba2Config, Mamba2State, Scan};

/// User + system CPU seconds of this process so far (all threads); 0 where /proc is missing.
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let after = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0 // USER_HZ is 100 on Linux
}

/// Wall and CPU seconds of one run.
#[derive(Clone, Copy)]
struct Timing {
    wall: f64,
    cpu: f64,
}

/// The run with the median wall time among `reps` runs of `f` (after one untimed warm-up if
/// `warm`), and the last run's result.
fn time<T>(reps: usize, warm: bool, mut f: impl FnMut() -> T) -> (Timing, T) {
    if warm {
        std::hint::black_box(f());
    }
    let mut runs = Vec::with_capacity(reps);
    let mut last = None;
    for _ in 0..reps.max(1) {
        let (t, c) = (Instant::now(), cpu_seconds());
        last = Some(std::hint::black_box(f()));
        runs.push(Timing {
            wall: t.elapsed().as_secs_f64(),
            cpu: cpu_seconds() - c,
        });
    }
    runs.sort_by(|a, b| a.wall.total_cmp(&b.wall));
    (runs[runs.len() / 2], last.expect("at least one run"))
}

fn env_list(name: &str, default: &[usize]) -> Vec<usize> {
    std::env::var(name)
        .ok()
        .map(|s| s.split(',').filter_map(|v| v.trim().parse().ok()).collect())
        .unwrap_or_else(|| default.to_vec())
}

struct Row {
    len: usize,
    prefill: Timing,
    prefill_naive: Option<Timing>,
    scan: Timing,
    scan_naive: Option<Timing>,
    decode: Timing,
}

fn main() -> matvlm::Result<()> {
    let dev = Device::Cpu;
    let cfg = Mamba2Config::from_attention(2560, 32, 80);
    let m = Mamba2::random(&cfg, DType::F32, &dev, 0)?;
    let lens = env_list("MAMBA2_BENCH_LENS", &[256, 1024, 4096]);
    let naive_max = env_list("MAMBA2_BENCH_NAIVE_MAX", &[4096])[0];
    let decode_steps = 64;
    println!(
        "Mamba-2 mixer, CPU f32, batch 1: d_model {}, {} heads x {}, d_state {}, {} groups, \
         d_conv {}, chunk {}; {} threads",
        cfg.d_model,
        cfg.n_heads,
        cfg.head_dim,
        cfg.d_state,
        cfg.n_groups,
        cfg.d_conv,
        cfg.chunk_size,
        candle_core::utils::get_num_threads()
    );

    let mut rows: Vec<Row> = vec![];
    for &len in &lens {
        let x = Tensor::randn(0f32, 1f32, (1, len, cfg.d_model), &dev)?;
        let reps = if len <= 1024 { 3 } else { 1 };
        let (prefill, out) = time(reps, true, || m.forward(&x, None));
        out?;
        let p = m.project(&x, None)?;
        let a = m.a()?;
        let chunked = || {
            ssd::chunked(
                &p.x,
                &p.dt,
                &a,
                &p.b,
                &p.c,
                Some(&m.d),
                cfg.chunk_size,
                None,
            )
        };
        let (scan, out) = time(reps, true, chunked);
        out?;
        let (prefill_naive, scan_naive) = if len <= naive_max {
            let (pn, out) = time(1, false, || m.forward_with(&x, None, Scan::Naive));
            out?;
            let (sn, out) = time(1, false, || {
                naive::scan(&p.x, &p.dt, &a, &p.b, &p.c, Some(&m.d), None)
            });
            out?;
            (Some(pn), Some(sn))
        } else {
            (None, None)
        };
        // Decoding after a prefill of `len` tokens (the cost per token must not depend on len).
        let (_, mut state) = m.forward(&x, None)?;
        let tokens = Tensor::randn(0f32, 1f32, (decode_steps, 1, cfg.d_model), &dev)?;
        let (mut decode, out) = time(1, false, || -> matvlm::Result<()> {
            for i in 0..decode_steps {
                m.step(&tokens.get(i)?, &mut state)?;
            }
            Ok(())
        });
        out?;
        decode.wall /= decode_steps as f64;
        decode.cpu /= decode_steps as f64;
        let row = Row {
            len,
            prefill,
            prefill_naive,
            scan,
            scan_naive,
            decode,
        };
        print_row(&row, rows.first());
        rows.push(row);
    }
    println!(
        "\n* growth = (CPU time / CPU time at L = {}) / (L / {}): 1.00 means linear in L.",
        lens[0], lens[0]
    );

    // The chunk length is a speed knob only (the result is the same): on a CPU a shorter chunk
    // trades the O(L * chunk) intra-chunk work for more, cheap, chunk-boundary states.
    if let Some(&len) = lens.last() {
        let x = Tensor::randn(0f32, 1f32, (1, len, cfg.d_model), &dev)?;
        let p = m.project(&x, None)?;
        let a = m.a()?;
        print!("scan alone at L = {len} by chunk length (wall / CPU s):");
        for chunk in [64, 128, 256] {
            let (t, out) = time(1, true, || {
                ssd::chunked(&p.x, &p.dt, &a, &p.b, &p.c, Some(&m.d), chunk, None)
            });
            out?;
            print!("  {chunk}: {:.2} / {:.2}", t.wall, t.cpu);
        }
        println!();
    }
    let state = Mamba2State::zeros(&cfg, 1, &dev)?;
    println!(
        "decode state per layer: {:.2} MiB (conv {:?} + ssm {:?}, f32)",
        state.bytes() as f64 / (1 << 20) as f64,
        state.conv.dims(),
        state.ssm.dims()
    );
    Ok(())
}

fn print_row(r: &Row, first: Option<&Row>) {
    if first.is_none() {
        println!(
            "\n{:>5} | {:^33} | {:^25} | {:^19} | {:^21}",
            "", "prefill, chunked SSD", "prefill, naive scan", "scan alone, CPU s", "decode"
        );
        println!(
            "{:>5} | {:>8} {:>6} {:>7} {:>8} | {:>8} {:>6} {:>9} | {:>9} {:>9} | {:>6} {:>6} {:>7}",
            "L",
            "wall ms",
            "tok/s",
            "CPU s",
            "growth*",
            "wall ms",
            "tok/s",
            "CPU s",
            "chunked",
            "naive",
            "tok/s",
            "ms/tok",
            "CPU ms"
        );
    }
    let tps = |s: f64| r.len as f64 / s;
    let opt =
        |v: Option<Timing>, f: &dyn Fn(Timing) -> String| v.map(f).unwrap_or_else(|| "-".into());
    let growth = match first {
        Some(f) => (r.prefill.cpu / f.prefill.cpu) / (r.len as f64 / f.len as f64),
        None => 1.0,
    };
    println!(
        "{:>5} | {:>8.0} {:>6.0} {:>7.2} {:>8.2} | {:>8} {:>6} {:>9} | {:>9.2} {:>9} | {:>6.1} {:>6.1} {:>7.1}",
        r.len,
        r.prefill.wall * 1e3,
        tps(r.prefill.wall),
        r.prefill.cpu,
        growth,
        opt(r.prefill_naive, &|t| format!("{:.0}", t.wall * 1e3)),
        opt(r.prefill_naive, &|t| format!("{:.0}", tps(t.wall))),
        opt(r.prefill_naive, &|t| format!("{:.2}", t.cpu)),
        r.scan.cpu,
        opt(r.scan_naive, &|t| format!("{:.2}", t.cpu)),
        1.0 / r.decode.wall,
        r.decode.wall * 1e3,
        r.decode.cpu * 1e3,
    );
}
