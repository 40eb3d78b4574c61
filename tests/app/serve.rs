//! `matrepl serve`'s OpenAI-compatible API on the embedded tiny teacher: answers equal to
//! `Vlm::generate`, streamed and not; errors in OpenAI's shape; batching of concurrent clients;
//! the queue limit; a client that leaves; the key, the binary and the rhai binding.

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use matvlm::generate::GenerateOptions;
use matvlm::serve::{ServeOptions, Server};
use matvlm::tokenize::single_turn_prompt;

use crate::common::{
    chat_body, data_uri, get_json, post_json, post_raw, post_stream, served_tiny_models, wait_for,
    world_questions,
};

const LONG: Duration = Duration::from_secs(120);

fn start(opts: ServeOptions) -> Server {
    Server::start(served_tiny_models(), ServeOptions { port: 0, ..opts }).unwrap()
}

fn chat_url(s: &Server) -> String {
    format!("http://{}/v1/chat/completions", s.addr)
}

/// What `Vlm::generate` answers (greedy) about the image.
fn expected(
    server_model: &matvlm::serve::ServedModel,
    q: &str,
    image: &Path,
    max: usize,
) -> String {
    let opts = GenerateOptions {
        max_new_tokens: max,
        ..GenerateOptions::default()
    };
    server_model
        .vlm
        .generate(
            &single_turn_prompt(q, true),
            Some(image),
            &opts,
            &mut |_| true,
        )
        .unwrap()
        .text
}

#[test]
fn serve_answers_equal_generate_streamed_and_not() {
    let dir = tempfile::tempdir().unwrap();
    let qs = world_questions(dir.path(), 3);
    let models = served_tiny_models();
    let server = Server::start(
        models.clone(),
        ServeOptions {
            port: 0,
            ..ServeOptions::default()
        },
    )
    .unwrap();
    let url = chat_url(&server);
    for m in &models {
        for q in &qs {
            let want = expected(m, &q.question, &q.image, 24);
            let body = chat_body(&m.id, &q.question, &data_uri(&q.image, "image/png"), 24);
            let (status, _, resp) = post_json(&url, &body, None);
            assert_eq!(status, 200, "{resp}");
            assert_eq!(resp["object"], "chat.completion");
            assert_eq!(resp["model"], m.id.as_str());
            assert_eq!(resp["choices"][0]["message"]["role"], "assistant");
            assert_eq!(
                resp["choices"][0]["message"]["content"],
                want.as_str(),
                "{}",
                m.id
            );
            let usage = &resp["usage"];
            let completion = usage["completion_tokens"].as_u64().unwrap();
            assert!(completion >= 1);
            assert_eq!(
                usage["total_tokens"].as_u64().unwrap(),
                usage["prompt_tokens"].as_u64().unwrap() + completion
            );
            // The prompt holds the template, the question and the 9 image positions.
            assert!(usage["prompt_tokens"].as_u64().unwrap() > 9);
            let reason = resp["choices"][0]["finish_reason"].as_str().unwrap();
            assert!(reason == "stop" || (reason == "length" && completion == 24));

            let mut body = body.clone();
            body["stream_options"] = serde_json::json!({ "include_usage": true });
            let s = post_stream(&url, &body);
            assert!(s.done, "the stream did not end with [DONE]");
            assert_eq!(s.text, want, "streamed answer of {}", m.id);
            assert_eq!(s.chunks[0]["choices"][0]["delta"]["role"], "assistant");
            let last = s.chunks.last().unwrap();
            assert_eq!(last["choices"][0]["finish_reason"], reason);
            assert_eq!(last["usage"], resp["usage"]);
            assert!(last["timings"]["cache_bytes"].as_u64().unwrap() > 0);
            assert!(
                s.chunks.len() >= 3,
                "one chunk per piece: {}",
                s.chunks.len()
            );
        }
    }
    // The teacher answers the world's questions (99% on its test split); the check above is
    // equality with `generate`, this one that the image reached the model.
    let right = qs
        .iter()
        .filter(|q| expected(&models[0], &q.question, &q.image, 24) == q.answer)
        .count();
    assert!(right >= 2, "the teacher got {right} of 3 right");

    let (status, list) = get_json(&format!("http://{}/v1/models", server.addr));
    assert_eq!(status, 200);
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["tiny-teacher", "tiny-hybrid"]);
    assert_eq!(list["data"][1]["kind"], "hybrid");
    let (status, health) = get_json(&format!("http://{}/health", server.addr));
    assert_eq!(status, 200);
    assert_eq!(health["status"], "ok");
    assert_eq!(health["workers"][0]["completed"], 12);
}

#[test]
fn serve_multi_turn_and_plain_text() {
    let dir = tempfile::tempdir().unwrap();
    let q = &world_questions(dir.path(), 1)[0];
    let server = start(ServeOptions::default());
    let models = served_tiny_models();
    let teacher = &models[0].vlm;
    let turns = [
        matvlm::tokenize::Turn {
            question: format!("<image>\n{}", q.question),
            answer: Some("yes".into()),
        },
        matvlm::tokenize::Turn {
            question: "What color is it?".into(),
            answer: None,
        },
    ];
    let prompt = matvlm::tokenize::phi_prompt(&turns);
    let want = teacher
        .generate(
            &prompt,
            Some(&q.image),
            &GenerateOptions::default(),
            &mut |_| true,
        )
        .unwrap()
        .text;
    let body = serde_json::json!({
        "model": "tiny-teacher",
        "messages": [
            { "role": "system", "content": "ignored: the template has its own" },
            { "role": "user", "content": [
                { "type": "text", "text": q.question },
                { "type": "image_url", "image_url": { "url": data_uri(&q.image, "image/png") } },
            ]},
            { "role": "assistant", "content": "yes" },
            { "role": "user", "content": "What color is it?" },
        ],
        "max_tokens": 64,
    });
    let (status, _, resp) = post_json(&chat_url(&server), &body, None);
    assert_eq!(status, 200, "{resp}");
    assert_eq!(resp["choices"][0]["message"]["content"], want.as_str());

    // Sampling: temperature, top-p and seed as `generate` takes them.
    let sampled = |seed: u64| {
        let opts = GenerateOptions {
            max_new_tokens: 32,
            temperature: 4.0,
            top_p: 0.98,
            seed,
            ..GenerateOptions::default()
        };
        let prompt = single_turn_prompt("Describe the image in one sentence.", true);
        // At this temperature characters whose bytes span tokens come up (seed 1 with today's
        // teacher): the streamed pieces must still add up to the text.
        let mut streamed = String::new();
        let g = teacher
            .generate(&prompt, Some(&q.image), &opts, &mut |piece| {
                streamed.push_str(piece);
                true
            })
            .unwrap();
        assert_eq!(streamed, g.text, "seed {seed}");
        g.text
    };
    let mut texts = Vec::new();
    for seed in [1, 2] {
        let mut body = crate::common::chat_body(
            "tiny-teacher",
            "Describe the image in one sentence.",
            &data_uri(&q.image, "image/png"),
            32,
        );
        body["temperature"] = 4.0.into();
        body["top_p"] = 0.98.into();
        body["seed"] = seed.into();
        let (status, _, resp) = post_json(&chat_url(&server), &body, None);
        assert_eq!(status, 200, "{resp}");
        let text = resp["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(text, sampled(seed), "seed {seed}");
        texts.push(text);
    }
    assert_ne!(texts[0], texts[1], "two seeds, one sample");

    // Stop strings end the answer before them, streamed or not; one that never comes changes
    // nothing (the tail held back in case it starts one is sent at the end).
    let describe = "Describe the image in one sentence.";
    let full = expected(&models[0], describe, &q.image, 64);
    let cut = full.find(" at").expect("a position in the description");
    // The answer's last characters and one more: held back to the end, then sent.
    let never = format!("{}!", &full[full.len() - 6..]);
    for (stop, want) in [
        (serde_json::json!(" at"), &full[..cut]),
        (
            serde_json::json!(["zzz", " a"]),
            &full[..full.find(" a").unwrap()],
        ),
        (serde_json::json!([never]), full.as_str()),
        (serde_json::json!(["."]), full.trim_end_matches('.')),
    ] {
        let mut body = crate::common::chat_body(
            "tiny-teacher",
            describe,
            &data_uri(&q.image, "image/png"),
            64,
        );
        body["stop"] = stop.clone();
        let (status, _, resp) = post_json(&chat_url(&server), &body, None);
        assert_eq!(status, 200, "{resp}");
        assert_eq!(
            resp["choices"][0]["message"]["content"], want,
            "stop {stop}"
        );
        assert_eq!(resp["choices"][0]["finish_reason"], "stop");
        let s = post_stream(&chat_url(&server), &body);
        assert_eq!(s.text, want, "streamed, stop {stop}");
    }

    // No image: a plain text prompt; `model` left out serves the first model.
    let want = teacher
        .generate(
            &single_turn_prompt("Hello", false),
            None,
            &GenerateOptions::default(),
            &mut |_| true,
        )
        .unwrap()
        .text;
    let body = serde_json::json!({ "messages": [{ "role": "user", "content": "Hello" }] });
    let (status, _, resp) = post_json(&chat_url(&server), &body, None);
    assert_eq!(status, 200, "{resp}");
    assert_eq!(resp["choices"][0]["message"]["content"], want.as_str());
}

fn assert_error(got: (u16, Option<String>, serde_json::Value), status: u16, needle: &str) {
    let (s, _, body) = got;
    assert_eq!(s, status, "{body}");
    let msg = body["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no OpenAI error body: {body}"));
    assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
    assert!(body["error"]["type"].is_string(), "{body}");
}

/// POST a body with `Expect: 100-continue`, sending it only if the server asks for it (as curl
/// does for large bodies). A server that refuses a body by its announced length answers
/// without reading it; a client that sends it anyway may find the connection closed under it.
fn post_expecting_continue(
    addr: std::net::SocketAddr,
    body: &str,
) -> (u16, Option<String>, serde_json::Value) {
    let mut sock = std::net::TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(LONG)).unwrap();
    write!(
        sock,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(sock.read(&mut byte).unwrap(), 1, "the server closed early");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(
        !head.starts_with("HTTP/1.1 100"),
        "the server asked for a body it cannot take: {head}"
    );
    let status: u16 = head[9..12].parse().unwrap();
    let mut rest = String::new();
    sock.read_to_string(&mut rest).unwrap();
    (
        status,
        None,
        serde_json::from_str(&rest).unwrap_or(serde_json::Value::Null),
    )
}

#[test]
fn serve_errors_are_openai_shaped_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let q = &world_questions(dir.path(), 1)[0];
    let allowed = tempfile::tempdir().unwrap();
    let inside = allowed.path().join("pic.png");
    std::fs::copy(&q.image, &inside).unwrap();
    let image_len = std::fs::metadata(&q.image).unwrap().len() as usize;
    let server = start(ServeOptions {
        max_body_bytes: 64 << 10,
        max_image_bytes: 16 << 10,
        image_dir: Some(allowed.path().to_path_buf()),
        ..ServeOptions::default()
    });
    assert!(image_len < 16 << 10, "the world's images are small");
    let url = chat_url(&server);
    let uri = data_uri(&q.image, "image/png");
    let ok = chat_body("tiny-teacher", &q.question, &uri, 8);

    assert_error(
        post_raw(&url, "{\"messages\": [", None),
        400,
        "not valid JSON",
    );
    assert_error(post_raw(&url, "{}", None), 400, "messages");
    let mut b = ok.clone();
    b["model"] = "gpt-4o".into();
    assert_error(post_json(&url, &b, None), 404, "unknown model `gpt-4o`");
    assert_error(
        post_json(
            &url,
            &chat_body("tiny-teacher", "q", "https://example.com/cat.png", 8),
            None,
        ),
        400,
        "http(s) URLs are refused",
    );
    assert_error(
        post_json(
            &url,
            &chat_body("tiny-teacher", "q", "ftp://host/cat.png", 8),
            None,
        ),
        400,
        "neither a data: URI nor a file:// URL",
    );
    let not_image = format!(
        "data:image/png;base64,{}",
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, b"not a picture")
    );
    assert_error(
        post_json(&url, &chat_body("tiny-teacher", "q", &not_image, 8), None),
        400,
        "not a PNG or JPEG",
    );
    assert_error(
        post_json(
            &url,
            &chat_body("tiny-teacher", "q", "data:image/png;base64,@@@", 8),
            None,
        ),
        400,
        "not base64",
    );
    let mut two = ok.clone();
    two["messages"][0]["content"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({ "type": "image_url", "image_url": { "url": uri } }));
    assert_error(post_json(&url, &two, None), 400, "at most 1");
    let missing =
        serde_json::json!({ "messages": [{ "role": "user", "content": "<image>\nWhat is it?" }] });
    assert_error(post_json(&url, &missing, None), 400, "the image is missing");
    let no_url = serde_json::json!({ "messages": [{ "role": "user", "content": [
        { "type": "image_url", "image_url": {} }, { "type": "text", "text": "What is it?" }
    ]}]});
    assert_error(
        post_json(&url, &no_url, None),
        400,
        "not valid JSON for this call",
    );
    let gone = format!("file://{}/nothing.png", allowed.path().display());
    assert_error(
        post_json(&url, &chat_body("tiny-teacher", "q", &gone, 8), None),
        400,
        "not a file under the allowed folder",
    );
    let no_user = serde_json::json!({ "messages": [{ "role": "system", "content": "hi" }] });
    assert_error(post_json(&url, &no_user, None), 400, "no user message");
    let ends_with_answer = serde_json::json!({ "messages": [
        { "role": "user", "content": "hi" }, { "role": "assistant", "content": "hello" }
    ]});
    assert_error(
        post_json(&url, &ends_with_answer, None),
        400,
        "last message",
    );
    let mut bad_role = ok.clone();
    bad_role["messages"][0]["role"] = "robot".into();
    assert_error(
        post_json(&url, &bad_role, None),
        400,
        "unknown role `robot`",
    );
    let mut two_choices = ok.clone();
    two_choices["n"] = 2.into();
    assert_error(
        post_json(&url, &two_choices, None),
        400,
        "one choice per request",
    );
    let mut bad_top_p = ok.clone();
    bad_top_p["top_p"] = 1.5.into();
    assert_error(post_json(&url, &bad_top_p, None), 400, "top_p");
    // Body and image limits: 413.
    let huge = "x".repeat(100 << 10);
    let big_body = chat_body("tiny-teacher", &huge, &uri, 8).to_string();
    assert_error(
        post_expecting_continue(server.addr, &big_body),
        413,
        "limit of 65536 bytes",
    );
    let big_png = {
        let path = dir.path().join("big.png");
        // Noise does not compress: well over the limit as a PNG.
        let noisy = image::RgbImage::from_fn(80, 80, |x, y| {
            let h = (x.wrapping_mul(2654435761) ^ y.wrapping_mul(40503)).wrapping_mul(2246822519);
            image::Rgb([h as u8, (h >> 8) as u8, (h >> 16) as u8])
        });
        noisy.save(&path).unwrap();
        path
    };
    assert!(std::fs::metadata(&big_png).unwrap().len() > 16 << 10);
    assert_error(
        post_json(
            &url,
            &chat_body("tiny-teacher", "q", &data_uri(&big_png, "image/png"), 8),
            None,
        ),
        413,
        "the limit is 16384",
    );
    // file:// URLs: inside the allowed folder only.
    let outside = format!("file://{}", q.image.display());
    assert_error(
        post_json(&url, &chat_body("tiny-teacher", "q", &outside, 8), None),
        400,
        "not a file under the allowed folder",
    );
    let sneaky = format!(
        "file://{}/../{}",
        allowed.path().display(),
        q.image.display()
    );
    assert_error(
        post_json(&url, &chat_body("tiny-teacher", "q", &sneaky, 8), None),
        400,
        "not a file under the allowed folder",
    );
    let mut from_file = chat_body(
        "tiny-teacher",
        &q.question,
        &format!("file://{}", inside.display()),
        8,
    );
    // Unknown fields are ignored: clients send many.
    from_file["frequency_penalty"] = 0.5.into();
    from_file["user"] = "someone".into();
    from_file["logit_bias"] = serde_json::json!({});
    let (status, _, by_file) = post_json(&url, &from_file, None);
    assert_eq!(status, 200, "{by_file}");
    let (status, _, by_uri) = post_json(&url, &ok, None);
    assert_eq!(status, 200, "{by_uri}");
    assert_eq!(
        by_file["choices"][0]["message"]["content"],
        by_uri["choices"][0]["message"]["content"]
    );
    let (status, body) = get_json(&format!("http://{}/v1/nothing", server.addr));
    assert_eq!(status, 404);
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("/v1/nothing"));
}

#[test]
fn serve_sixteen_streaming_clients_batched() {
    let dir = tempfile::tempdir().unwrap();
    let qs = world_questions(dir.path(), 16);
    let models = served_tiny_models();
    let server = Server::start(
        models.clone(),
        ServeOptions {
            port: 0,
            queue: 16,
            max_batch: 16,
            ..ServeOptions::default()
        },
    )
    .unwrap();
    let url = chat_url(&server);
    // Held until all sixteen wait, so that they are generated as one batch.
    server.pause();
    let clients: Vec<_> = qs
        .iter()
        .map(|q| {
            let body = chat_body(
                "tiny-teacher",
                &q.question,
                &data_uri(&q.image, "image/png"),
                16,
            );
            let url = url.clone();
            std::thread::spawn(move || post_stream(&url, &body))
        })
        .collect();
    wait_for("16 queued requests", LONG, || {
        server.stats()[0].queued == 16
    });
    server.resume();
    for (client, q) in clients.into_iter().zip(&qs) {
        let got = client.join().unwrap();
        assert!(got.done);
        assert_eq!(
            got.text,
            expected(&models[0], &q.question, &q.image, 16),
            "{}",
            q.question
        );
        let t = &got.chunks.last().unwrap()["timings"];
        assert_eq!(t["batch_size"], 16);
    }
    let stats = &server.stats()[0];
    assert_eq!(stats.completed, 16);
    assert_eq!(stats.largest_batch, 16);
    assert_eq!((stats.batches, stats.most_models_at_once), (1, 1));
}

#[test]
fn serve_two_models_generate_side_by_side() {
    let dir = tempfile::tempdir().unwrap();
    let q = &world_questions(dir.path(), 1)[0];
    let models = served_tiny_models();
    let server = start(ServeOptions::default());
    let url = chat_url(&server);
    let describe = "Describe the image in one sentence.";
    server.pause();
    let clients: Vec<_> = models
        .iter()
        .map(|m| {
            let body = chat_body(&m.id, describe, &data_uri(&q.image, "image/png"), 32);
            let url = url.clone();
            std::thread::spawn(move || post_stream(&url, &body))
        })
        .collect();
    wait_for("both requests queued", LONG, || {
        server.stats()[0].queued == 2
    });
    server.resume();
    for (client, m) in clients.into_iter().zip(&models) {
        let got = client.join().unwrap();
        assert!(got.done);
        assert_eq!(got.text, expected(m, describe, &q.image, 32), "{}", m.id);
    }
    let stats = &server.stats()[0];
    assert_eq!((stats.completed, stats.batches), (2, 2));
    assert_eq!(stats.most_models_at_once, 2);
}

#[test]
fn serve_full_queue_answers_429() {
    let dir = tempfile::tempdir().unwrap();
    let q = &world_questions(dir.path(), 1)[0];
    let server = start(ServeOptions {
        queue: 1,
        ..ServeOptions::default()
    });
    let url = chat_url(&server);
    let body = chat_body(
        "tiny-teacher",
        &q.question,
        &data_uri(&q.image, "image/png"),
        8,
    );
    server.pause();
    let first = {
        let (url, body) = (url.clone(), body.clone());
        std::thread::spawn(move || post_json(&url, &body, None))
    };
    wait_for("one queued request", LONG, || server.stats()[0].queued == 1);
    let (status, retry, err) = post_json(&url, &body, None);
    assert_eq!(status, 429, "{err}");
    assert_eq!(retry.as_deref(), Some("1"));
    assert_eq!(err["error"]["type"], "rate_limit_error");
    assert!(err["error"]["message"]
        .as_str()
        .unwrap()
        .contains("queue is full"));
    server.resume();
    let (status, _, resp) = first.join().unwrap();
    assert_eq!(status, 200, "{resp}");
    let (status, _, _) = post_json(&url, &body, None);
    assert_eq!(status, 200);
    let stats = &server.stats()[0];
    assert_eq!((stats.rejected, stats.completed), (1, 2));
}

#[test]
fn serve_client_disconnect_stops_its_generation() {
    let dir = tempfile::tempdir().unwrap();
    let q = &world_questions(dir.path(), 1)[0];
    let server = start(ServeOptions::default());
    let mut body = chat_body(
        "tiny-teacher",
        &q.question,
        &data_uri(&q.image, "image/png"),
        100_000,
    );
    body["stream"] = true.into();
    // Past EOS to the end of the context: far longer than noticing the disconnect takes.
    body["ignore_eos"] = true.into();
    let body = body.to_string();
    let mut sock = std::net::TcpStream::connect(server.addr).unwrap();
    sock.set_read_timeout(Some(LONG)).unwrap();
    write!(
        sock,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("\"content\":\"") {
        let n = sock.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "the stream ended early: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&seen).starts_with("HTTP/1.1 200"));
    sock.shutdown(std::net::Shutdown::Both).unwrap();
    drop(sock);
    wait_for("the worker to drop the generation", LONG, || {
        let s = &server.stats()[0];
        s.cancelled == 1 && s.running == 0
    });
    assert_eq!(server.stats()[0].completed, 0);
    // The worker is free for the next client.
    let (status, _, resp) = post_json(
        &chat_url(&server),
        &chat_body(
            "tiny-teacher",
            &q.question,
            &data_uri(&q.image, "image/png"),
            8,
        ),
        None,
    );
    assert_eq!(status, 200, "{resp}");
    assert_eq!(server.stats()[0].completed, 1);
}

#[test]
fn serve_api_key_cors_and_binding_policy() {
    let server = start(ServeOptions {
        api_key: Some("sesame".into()),
        cors: true,
        ..ServeOptions::default()
    });
    let url = chat_url(&server);
    let body =
        serde_json::json!({ "messages": [{ "role": "user", "content": "Hi" }], "max_tokens": 4 });
    let (status, _, err) = post_json(&url, &body, None);
    assert_eq!(status, 401, "{err}");
    assert!(err["error"]["message"].as_str().unwrap().contains("Bearer"));
    let (status, _, _) = post_json(&url, &body, Some("wrong"));
    assert_eq!(status, 401);
    let (status, _, resp) = post_json(&url, &body, Some("sesame"));
    assert_eq!(status, 200, "{resp}");
    // The page and the health check stay open; the page asks for the key.
    let page = ureq::get(&server.url()).call().unwrap();
    assert_eq!(page.header("Access-Control-Allow-Origin"), Some("*"));
    assert!(page.into_string().unwrap().contains("/v1/chat/completions"));
    let pre = ureq::request("OPTIONS", &url).call().unwrap();
    assert_eq!(pre.status(), 204);
    assert!(pre
        .header("Access-Control-Allow-Headers")
        .unwrap()
        .contains("authorization"));

    let closed = start(ServeOptions::default());
    let page = ureq::get(&closed.url()).call().unwrap();
    assert_eq!(page.header("Access-Control-Allow-Origin"), None);

    // Another host than loopback without a key: refused before serving.
    let err = Server::start(
        served_tiny_models(),
        ServeOptions {
            host: "0.0.0.0".into(),
            port: 0,
            ..ServeOptions::default()
        },
    )
    .err()
    .expect("binding 0.0.0.0 without a key is refused");
    assert!(err.to_string().contains("API key"), "{err}");
}

#[test]
fn serve_figure_of_the_last_answer() {
    let dir = tempfile::tempdir().unwrap();
    let q = &world_questions(dir.path(), 1)[0];
    let server = start(ServeOptions::default());
    let body = serde_json::json!({
        "model": "tiny-hybrid",
        "layer": 4,
        "messages": [
            { "role": "user", "content": [
                { "type": "image_url", "image_url": { "url": data_uri(&q.image, "image/png") } },
                { "type": "text", "text": q.question },
            ]},
            { "role": "assistant", "content": q.answer },
        ],
    });
    let resp = ureq::post(&format!("http://{}/v1/attention_vs_ssm", server.addr))
        .send_json(body.clone())
        .unwrap();
    assert_eq!(resp.content_type(), "image/png");
    let mut png = Vec::new();
    resp.into_reader().read_to_end(&mut png).unwrap();
    let path = dir.path().join("figure.png");
    std::fs::write(&path, png).unwrap();
    crate::common::check_png(&path);
    let mut attn = body;
    attn["layer"] = 1.into();
    let (status, _, err) = post_json(
        &format!("http://{}/v1/attention_vs_ssm", server.addr),
        &attn,
        None,
    );
    assert_eq!(status, 400);
    assert!(err["error"]["message"]
        .as_str()
        .unwrap()
        .contains("layer 1 of the hybrid is attention"));
}

/// Start `cmd` (a server on a free port), read the address it prints, GET `/health`, and kill it.
fn health_of_child(mut cmd: std::process::Command) -> (u16, serde_json::Value) {
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .map(str::to_string);
    let health = addr
        .as_ref()
        .map(|a| get_json(&format!("http://{a}/health")));
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    health.unwrap_or_else(|| {
        panic!(
            "no address in {line:?}; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
fn serve_binary_and_rhai_binding() {
    // `matrepl serve` with the default models, on a free port.
    let mut cmd = crate::common::matrepl_command();
    cmd.args(["serve", "--port", "0"]);
    let (status, health) = health_of_child(cmd);
    assert_eq!(status, 200);
    assert_eq!(
        health["models"],
        serde_json::json!(["tiny-teacher", "tiny-hybrid-0.25-undistilled"])
    );
    // The rhai binding, with models named in a map.
    let mut cmd = crate::common::matrepl_command();
    cmd.args([
        "-e",
        r#"let t = teacher(); serve(#{ models: #{ a: t, b: t.hybrid(#{ ratio: 0.5 }) }, port: 0 })"#,
    ]);
    let (status, health) = health_of_child(cmd);
    assert_eq!(status, 200);
    assert_eq!(health["models"], serde_json::json!(["a", "b"]));

    let out = crate::common::matrepl_command()
        .args(["serve", "--host", "0.0.0.0", "--port", "0"])
        .env_remove(matvlm::serve::API_KEY_ENV)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("API key"));

    let engine = matvlm::script::engine(&matvlm::script::Session::default());
    let err = engine
        .eval::<rhai::Dynamic>("serve(#{ models: [], port: 0 })")
        .unwrap_err();
    assert!(err.to_string().contains("no models"), "{err}");
    let err = engine
        .eval::<rhai::Dynamic>(r#"serve(#{ models: [42], port: 0 })"#)
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("neither a Model nor a checkpoint path"),
        "{err}"
    );
    let err = engine
        .eval::<rhai::Dynamic>(r#"serve(#{ models: [], prot: 0 })"#)
        .unwrap_err();
    assert!(err.to_string().contains("prot"), "{err}");
}
