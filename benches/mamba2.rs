//! CPU benchmark of the Mamba-2 mixer at the Phi-2 hybrid's shape (d_model 2560, 32 heads x 80,
//! d_state 80, 32 groups, d_conv 4, chunk 256), batch 1, f32: chunked prefill against the
//! sequential recurrence, the scan alone, and decoding. Prints a table.
//!
//! Run: `cargo bench --bench mamba2` (release). `MAMBA2_BENCH_LENS=256,1024` picks the lengths,
//! `MAMBA2_BENCH_NAIVE_MAX=1024` the longest length the slow naive paths are timed at.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use matvlm::model::mamba2::{naive, ssd, Mamba2, Mamba2Config, Mamba2State, Scan};

/// Median wall time in seconds of `reps` runs of `f` (after one untimed warm-up if `warm`).
fn time<T>(reps: usize, warm: bool, mut f: impl FnMut() -> T) -> f64 {
    if warm {
        std::hint::black_box(f());
    }
    let mut times: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(f());
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(|a, b| a.total_cmp(b));
    times[times.len() / 2]
}

fn env_list(name: &str, default: &[usize]) -> Vec<usize> {
    std::env::var(name)
        .ok()
        .map(|s| s.split(',').filter_map(|v| v.trim().parse().ok()).collect())
        .unwrap_or_else(|| default.to_vec())
}

struct Row {
    len: usize,
    prefill: f64,
    prefill_naive: Option<f64>,
    scan: f64,
    scan_naive: Option<f64>,
    decode: f64,
}

fn main() -> matvlm::Result<()> {
    let dev = Device::Cpu;
    let cfg = Mamba2Config::from_attention(2560, 32, 80);
    let m = Mamba2::random(&cfg, DType::F32, &dev, 0)?;
    let lens = env_list("MAMBA2_BENCH_LENS", &[256, 1024, 4096]);
    let naive_max = env_list("MAMBA2_BENCH_NAIVE_MAX", &[4096])[0];
    let decode_steps = 64;
    println!(
        "Mamba-2 mixer, CPU f32, batch 1: d_model {}, {} heads x {}, d_state {}, {} groups, d_conv {}, chunk {}; {} threads",
        cfg.d_model,
        cfg.n_heads,
        cfg.head_dim,
        cfg.d_state,
        cfg.n_groups,
        cfg.d_conv,
        cfg.chunk_size,
        candle_core::utils::get_num_threads()
    );

    let mut rows = vec![];
    for &len in &lens {
        let x = Tensor::randn(0f32, 1f32, (1, len, cfg.d_model), &dev)?;
        let reps = if len <= 1024 { 3 } else { 1 };
        let prefill = time(reps, true, || m.forward(&x, None).map(|r| r.0));
        let p = m.project(&x, None)?;
        let a = m.a()?;
        let scan = time(reps, true, || {
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
        });
        let (prefill_naive, scan_naive) = if len <= naive_max {
            (
                Some(time(1, false, || {
                    m.forward_with(&x, None, Scan::Naive).map(|r| r.0)
                })),
                Some(time(1, false, || {
                    naive::scan(&p.x, &p.dt, &a, &p.b, &p.c, Some(&m.d), None)
                })),
            )
        } else {
            (None, None)
        };
        // Decoding after a prefill of `len` tokens (the cost per token must not depend on len).
        let (_, mut state) = m.forward(&x, None)?;
        let tokens = Tensor::randn(0f32, 1f32, (decode_steps, 1, cfg.d_model), &dev)?;
        let t = Instant::now();
        for i in 0..decode_steps {
            std::hint::black_box(m.step(&tokens.get(i)?, &mut state)?);
        }
        let decode = t.elapsed().as_secs_f64() / decode_steps as f64;
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
    // The chunk length is a speed knob only (the result is the same): on a CPU a shorter chunk
    // trades the O(L * chunk) intra-chunk work for more, cheap, chunk-boundary states.
    if let Some(&len) = lens.last() {
        let x = Tensor::randn(0f32, 1f32, (1, len, cfg.d_model), &dev)?;
        let p = m.project(&x, None)?;
        let a = m.a()?;
        print!("\nscan alone at L = {len} by chunk length:");
        for chunk in [64, 128, 256] {
            let s = time(1, true, || {
                ssd::chunked(&p.x, &p.dt, &a, &p.b, &p.c, Some(&m.d), chunk, None)
            });
            print!("  {chunk}: {:.1} ms", s * 1e3);
        }
        println!();
    }
    let state = Mamba2State::zeros(&cfg, 1, &dev)?;
    println!(
        "\n* growth = (time / time at L = {}) / (L / {}): 1.00 means linear in L.\ndecode state per layer: {:.2} MiB (conv {:?} + ssm {:?}, f32)",
        lens[0],
        lens[0],
        state.bytes() as f64 / (1 << 20) as f64,
        state.conv.dims(),
        state.ssm.dims()
    );
    Ok(())
}

fn print_row(r: &Row, first: Option<&Row>) {
    if first.is_none() {
        println!(
            "\n{:>6} | {:>30} | {:>21} | {:>21} | {:>16}",
            "L", "prefill, chunked SSD", "prefill, naive scan", "scan alone (ms)", "decode"
        );
        println!(
            "{:>6} | {:>9} {:>9} {:>10} | {:>9} {:>11} | {:>10} {:>10} | {:>16}",
            "", "ms", "tok/s", "growth*", "ms", "tok/s", "chunked", "naive", "tok/s (ms/tok)"
        );
    }
    let tps = |s: f64| r.len as f64 / s;
    let opt = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map(f).unwrap_or_else(|| "-".into());
    // Prefill time relative to the first row, divided by the length ratio: 1.00 is linear.
    let growth = match first {
        Some(f) => (r.prefill / f.prefill) / (r.len as f64 / f.len as f64),
        None => 1.0,
    };
    println!(
        "{:>6} | {:>9.1} {:>9.0} {:>10.2} | {:>9} {:>11} | {:>10.1} {:>10} | {:>7.1} ({:>5.2})",
        r.len,
        r.prefill * 1e3,
        tps(r.prefill),
        growth,
        opt(r.prefill_naive, &|v| format!("{:.1}", v * 1e3)),
        opt(r.prefill_naive, &|v| format!("{:.0}", tps(v))),
        r.scan * 1e3,
        opt(r.scan_naive, &|v| format!("{:.1}", v * 1e3)),
        1.0 / r.decode,
        r.decode * 1e3,
    );
}
