//! The web chat in a real headless Chromium, driven through chromedriver's WebDriver protocol:
//! pick an image, ask, watch the streamed answer arrive, compare teacher and hybrid side by
//! side, show the attention-vs-SSM figure. `MATVLM_SCREENSHOTS=DIR` keeps the screenshots
//! (`chat.png`, `compare.png`) there.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use matvlm::generate::GenerateOptions;
use matvlm::serve::{ServeOptions, Server};
use matvlm::tokenize::single_turn_prompt;

use crate::common::{served_tiny_models, wait_for, world_questions};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";
const LONG: Duration = Duration::from_secs(120);

/// A chromedriver process and one browser session in it.
struct Browser {
    driver: Child,
    base: String,
    session: String,
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

impl Browser {
    fn start() -> Browser {
        let driver_path = std::env::var_os("CHROMEDRIVER")
            .map(PathBuf::from)
            .or_else(|| on_path("chromedriver"))
            .expect(
                "chromedriver not found: install Debian's chromium and chromium-driver \
                 (.ci/run does) or set CHROMEDRIVER",
            );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = Command::new(&driver_path)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", driver_path.display()));
        let base = format!("http://127.0.0.1:{port}");
        let mut browser = Browser {
            driver,
            base,
            session: String::new(),
        };
        wait_for("chromedriver to be ready", LONG, || {
            ureq::get(&format!("{}/status", browser.base))
                .call()
                .ok()
                .and_then(|r| r.into_json::<Value>().ok())
                .is_some_and(|v| v["value"]["ready"] == true)
        });
        let mut options = json!({
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1400,1000"],
        });
        if let Some(chromium) = on_path("chromium") {
            options["binary"] = chromium.display().to_string().into();
        }
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome", "goog:chromeOptions": options,
        }}});
        let v = browser.call("POST", "/session", Some(caps));
        browser.session = v["sessionId"].as_str().expect("a session id").to_string();
        browser
    }

    /// One WebDriver command; returns its `value`, panicking with the driver's error.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let url = if path == "/session" {
            format!("{}{path}", self.base)
        } else {
            format!("{}/session/{}{path}", self.base, self.session)
        };
        let req = ureq::request(method, &url).timeout(LONG);
        let resp = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        let resp = match resp {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{method} {url}: {e}"),
        };
        let status = resp.status();
        let v: Value = resp.into_json().unwrap();
        assert_eq!(status, 200, "{method} {path}: {v}");
        v["value"].clone()
    }

    fn goto(&self, url: &str) {
        self.call("POST", "/url", Some(json!({ "url": url })));
    }

    fn find(&self, css: &str) -> String {
        let v = self.call(
            "POST",
            "/element",
            Some(json!({ "using": "css selector", "value": css })),
        );
        v[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no element {css}: {v}"))
            .to_string()
    }

    fn type_into(&self, css: &str, text: &str) {
        let el = self.find(css);
        self.call(
            "POST",
            &format!("/element/{el}/value"),
            Some(json!({ "text": text })),
        );
    }

    fn click(&self, css: &str) {
        let el = self.find(css);
        self.call("POST", &format!("/element/{el}/click"), Some(json!({})));
    }

    fn js(&self, script: &str) -> Value {
        self.call(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": [] })),
        )
    }

    fn wait_js(&self, what: &str, condition: &str) {
        let script = format!("return !!({condition});");
        wait_for(what, LONG, || self.js(&script) == Value::Bool(true));
    }

    fn screenshot(&self, path: &Path) {
        use base64::Engine as _;
        let b64 = self.call("GET", "/screenshot", None);
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().unwrap())
            .unwrap();
        std::fs::write(path, png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = ureq::delete(&format!("{}/session/{}", self.base, self.session)).call();
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// The text of the assistant answers of column `col`, once all of them are complete.
fn answers(b: &Browser, col: usize) -> Vec<String> {
    let v = b.js(&format!(
        "return [...document.querySelectorAll('#column-{col} .msg.assistant')].map(e => e.textContent);"
    ));
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

fn done(col: usize, n: usize) -> String {
    format!(
        "document.querySelectorAll('#column-{col} .msg.assistant[data-done=\"1\"]').length == {n}"
    )
}

#[test]
fn serve_page_in_headless_chromium() {
    let dir = tempfile::tempdir().unwrap();
    let qs = world_questions(dir.path(), 2);
    let models = served_tiny_models();
    let server = Server::start(
        models.clone(),
        ServeOptions {
            port: 0,
            ..ServeOptions::default()
        },
    )
    .unwrap();
    let shots = std::env::var_os("MATVLM_SCREENSHOTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| dir.path().to_path_buf());
    std::fs::create_dir_all(&shots).unwrap();
    let expected = |m: usize, q: &str, image: &Path| {
        let opts = GenerateOptions {
            max_new_tokens: 64,
            ..GenerateOptions::default()
        };
        let text = models[m]
            .vlm
            .generate(
                &single_turn_prompt(q, true),
                Some(image),
                &opts,
                &mut |_| true,
            )
            .unwrap()
            .text;
        if text.is_empty() {
            "(empty answer: the model ended at once)".to_string()
        } else {
            text
        }
    };

    let b = Browser::start();
    b.goto(&server.url());
    b.wait_js(
        "the model list",
        "document.querySelectorAll('#model option').length == 2",
    );
    assert_eq!(
        b.js("return document.getElementById('model').value;"),
        "tiny-teacher"
    );

    // Pick the image through the file input, ask, and see the streamed answer.
    let q = &qs[0];
    b.type_into("#image-input", &q.image.display().to_string());
    b.wait_js(
        "the preview",
        "document.getElementById('preview').style.display == 'block'",
    );
    b.type_into("#question", &q.question);
    b.click("#send");
    b.wait_js("the streamed answer", &done(0, 1));
    assert_eq!(answers(&b, 0), [expected(0, &q.question, &q.image)]);
    let stats = b.js("return document.querySelector('#column-0 .stats').textContent;");
    assert!(stats.as_str().unwrap().contains("tok/s"), "{stats}");
    // Regenerate replaces the last answer (greedy: with the same text).
    b.click("#regenerate");
    b.wait_js("the regenerated answer", &done(0, 1));
    assert_eq!(answers(&b, 0), [expected(0, &q.question, &q.image)]);
    // A follow-up turn in the same conversation.
    b.type_into("#question", "Describe the image in one sentence.");
    b.click("#send");
    b.wait_js("the second answer", &done(0, 2));
    assert_eq!(answers(&b, 0).len(), 2);
    b.screenshot(&shots.join("chat.png"));
    crate::common::check_png(&shots.join("chat.png"));

    // Compare mode: the same question to the teacher and the hybrid, side by side.
    b.click("#compare");
    b.wait_js(
        "two columns",
        "document.getElementById('column-1') !== null",
    );
    assert_eq!(
        b.js("return document.getElementById('column-1').dataset.model;"),
        "tiny-hybrid"
    );
    let q = &qs[1];
    b.js("window.previousImage = document.getElementById('preview').src; return null;");
    b.type_into("#image-input", &q.image.display().to_string());
    // A new image starts a new conversation once it is read.
    b.wait_js(
        "the second image",
        "document.getElementById('preview').src != window.previousImage",
    );
    assert_eq!(b.js("return document.querySelectorAll('.msg').length;"), 0);
    // A question with a sentence for an answer, so that both stream several tokens.
    let describe = "Describe the image in one sentence.";
    b.type_into("#question", describe);
    b.click("#send");
    b.wait_js("both answers", &format!("{} && {}", done(0, 1), done(1, 1)));
    assert_eq!(answers(&b, 0), [expected(0, describe, &q.image)]);
    assert_eq!(answers(&b, 1), [expected(1, describe, &q.image)]);
    for col in 0..2 {
        let stats = b.js(&format!(
            "return document.querySelector('#column-{col} .stats').textContent;"
        ));
        let stats = stats.as_str().unwrap();
        assert!(
            stats.contains("tok/s") && stats.contains("cache"),
            "{stats}"
        );
    }
    // The figure of the hybrid's last answer.
    b.click("#figure-btn");
    b.wait_js(
        "the attention-vs-SSM figure",
        "document.getElementById('figure').naturalWidth > 0",
    );
    b.screenshot(&shots.join("compare.png"));
    crate::common::check_png(&shots.join("compare.png"));

    // Clear forgets the conversation and the image.
    b.click("#clear");
    assert_eq!(b.js("return document.querySelectorAll('.msg').length;"), 0);
    assert_eq!(
        b.js("return document.getElementById('preview').style.display;"),
        "none"
    );
}
