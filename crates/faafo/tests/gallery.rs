//! The web gallery in a real browser: headless Chromium against `faafo up`.

mod common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use faafo_core::FractalState;
use faafo_core::wire::CreateFractal;

const CHROMIUM: &str = "/usr/bin/chromium";

/// Runs headless Chromium with `args` on `url`, returning what it printed.
fn chromium(profile: &Path, args: &[&str], url: &str) -> String {
    assert!(
        Path::new(CHROMIUM).exists(),
        "Chromium is needed for the gallery tests: apt-get install chromium"
    );
    let output = Command::new(CHROMIUM)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
        ])
        .args([
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .output()
        .expect("chromium runs");
    assert!(
        output.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Headless Chromium driven over the DevTools protocol on a pipe
/// (`--remote-debugging-pipe`: JSON messages ending in NUL, read on fd 3, written on fd 4).
struct DevTools {
    child: Child,
    to_browser: std::io::PipeWriter,
    from_browser: mpsc::Receiver<serde_json::Value>,
    session: Option<String>,
    next_id: u64,
}

impl DevTools {
    fn launch(profile: &Path) -> DevTools {
        let (browser_reads, to_browser) = std::io::pipe().unwrap();
        let (from_browser, browser_writes) = std::io::pipe().unwrap();
        let (read_fd, write_fd) = (browser_reads.as_raw_fd(), browser_writes.as_raw_fd());
        let mut command = Command::new(CHROMIUM);
        command
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
            ])
            .args(["--disable-background-networking", "--remote-debugging-pipe"])
            .arg(format!("--user-data-dir={}", profile.display()))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        // SAFETY: only async-signal-safe calls between fork and exec. The copies above
        // fd 10 keep the two dup2 calls from overwriting each other's source.
        unsafe {
            command.pre_exec(move || {
                let read_copy = libc::fcntl(read_fd, libc::F_DUPFD, 10);
                let write_copy = libc::fcntl(write_fd, libc::F_DUPFD, 10);
                if read_copy < 0
                    || write_copy < 0
                    || libc::dup2(read_copy, 3) < 0
                    || libc::dup2(write_copy, 4) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().expect("chromium starts");
        drop((browser_reads, browser_writes));
        let (messages, from_browser_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(from_browser);
            let mut message = Vec::new();
            while reader.read_until(0, &mut message).unwrap_or(0) > 0 {
                message.pop();
                if let Ok(value) = serde_json::from_slice(&message)
                    && messages.send(value).is_err()
                {
                    return;
                }
                message.clear();
            }
        });
        DevTools {
            child,
            to_browser,
            from_browser: from_browser_rx,
            session: None,
            next_id: 1,
        }
    }

    /// Sends one command (to the attached page, once there is one) and returns its result.
    fn call(&mut self, method: &str, params: serde_json::Value) -> serde_json::Value {
        let id = self.next_id;
        self.next_id += 1;
        let mut message = serde_json::json!({ "id": id, "method": method, "params": params });
        if let Some(session) = &self.session {
            message["sessionId"] = session.clone().into();
        }
        let mut bytes = serde_json::to_vec(&message).unwrap();
        bytes.push(0);
        self.to_browser.write_all(&bytes).unwrap();
        let reply = self.next_message(&format!("the answer to {method}"), |m| m["id"] == id);
        assert!(reply.get("error").is_none(), "{method}: {reply}");
        reply["result"].clone()
    }

    fn wait_for_event(&mut self, method: &str) {
        self.next_message(method, |m| m["method"] == method);
    }

    /// The next message `wanted` picks, skipping others, within 60 s.
    fn next_message(
        &mut self,
        what: &str,
        wanted: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.from_browser.recv_timeout(left) {
                Ok(message) if wanted(&message) => return message,
                Ok(_) => {}
                Err(error) => panic!("no {what} from Chromium: {error}"),
            }
        }
    }

    /// Opens `url` in a new tab and waits for its load event.
    fn open(&mut self, url: &str) {
        let target = self.call(
            "Target.createTarget",
            serde_json::json!({ "url": "about:blank" }),
        );
        let attached = self.call(
            "Target.attachToTarget",
            serde_json::json!({ "targetId": target["targetId"], "flatten": true }),
        );
        self.session = Some(attached["sessionId"].as_str().unwrap().to_owned());
        self.call("Page.enable", serde_json::json!({}));
        self.call("Page.navigate", serde_json::json!({ "url": url }));
        self.wait_for_event("Page.loadEventFired");
    }

    /// Evaluates `expression` in the page, awaiting it if it is a promise.
    fn evaluate(&mut self, expression: &str) -> serde_json::Value {
        let result = self.call(
            "Runtime.evaluate",
            serde_json::json!({ "expression": expression, "awaitPromise": true, "returnByValue": true }),
        );
        assert!(result.get("exceptionDetails").is_none(), "{result}");
        result["result"]["value"].clone()
    }
}

impl Drop for DevTools {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn fractal(width: u32, height: u32, iterations: u32) -> CreateFractal {
    CreateFractal {
        width,
        height,
        iterations,
        ..small_fractal()
    }
}

/// Pixels of `png` whose colour is one of the renderer's palette colours (black aside).
fn palette_pixels(png: &[u8]) -> (usize, usize, usize) {
    let palette: HashSet<[u8; 3]> = faafo_render::PALETTE
        .chunks(3)
        .skip(1)
        .map(|rgb| [rgb[0], rgb[1], rgb[2]])
        .collect();
    let pixels = rgb_pixels(png);
    let mut seen = HashSet::new();
    let mut matching = 0;
    for rgb in &pixels {
        if palette.contains(rgb) {
            matching += 1;
            seen.insert(*rgb);
        }
    }
    (matching, pixels.len(), seen.len())
}

/// The colour of every pixel of `png`.
fn rgb_pixels(png: &[u8]) -> Vec<[u8; 3]> {
    let mut reader = png::Decoder::new(std::io::Cursor::new(png))
        .read_info()
        .unwrap();
    let mut buffer = vec![0; reader.output_buffer_size().unwrap()];
    let frame = reader.next_frame(&mut buffer).unwrap();
    let channels = frame.color_type.samples();
    buffer[..frame.buffer_size()]
        .chunks(channels)
        .map(|pixel| [pixel[0], pixel[1], pixel[2]])
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_gallery_shows_thumbnails_pages_and_details() {
    let dir = tempfile::tempdir().unwrap();
    let profile = dir.path().join("chromium-profile");
    let up = spawn_up(dir.path(), "up", 2);
    let client = client(up.url());
    let mut created = Vec::new();
    for _ in 0..7 {
        created.push(client.create(&fractal(600, 400, 256)).await.unwrap().uuid);
    }
    for uuid in &created {
        wait_for_state(&client, *uuid, FractalState::Done, Duration::from_secs(60)).await;
    }

    // Page 1: the five newest, every thumbnail loaded, a link to page 2.
    let dom = chromium(&profile, &["--dump-dom"], &format!("{}/", up.url()));
    assert_eq!(dom.matches("<li class=\"card").count(), 5, "{dom}");
    assert_eq!(
        dom.matches("data-loaded=\"yes\"").count(),
        5,
        "every thumbnail loaded:\n{dom}"
    );
    for uuid in created.iter().rev().take(5) {
        assert!(
            dom.contains(&format!("/view/{uuid}")),
            "newest first: {uuid} missing"
        );
    }
    assert!(dom.contains("href=\"/index/2\"") && dom.contains("page 1 of 2"));
    for label in [
        "UUID",
        "Duration",
        "Dimensions",
        "Iterations",
        "Parameters",
        "File size",
        "Checksum",
        "Generated by",
    ] {
        assert!(
            dom.contains(&format!("<th>{label}</th>")),
            "field {label} missing"
        );
    }
    let second = chromium(&profile, &["--dump-dom"], &format!("{}/index/2", up.url()));
    assert_eq!(second.matches("<li class=\"card").count(), 2);

    // The screenshot shows the fractals themselves, not broken images.
    let screenshot = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("gallery.png");
    chromium(
        &profile,
        &[
            "--window-size=1280,1800",
            &format!("--screenshot={}", screenshot.display()),
        ],
        &format!("{}/", up.url()),
    );
    let (matching, total, colours) = palette_pixels(&std::fs::read(&screenshot).unwrap());
    println!(
        "gallery screenshot: {} ({matching} of {total} pixels in {colours} fractal colours)",
        screenshot.display()
    );
    assert!(
        colours >= 8,
        "only {colours} fractal colours in the screenshot"
    );
    assert!(
        matching * 10 > total,
        "thumbnails cover too little of the page: {matching} of {total}"
    );

    // A phone-sized window gets the one-column layout.
    let phone = dir.path().join("phone.png");
    chromium(
        &profile,
        &[
            "--window-size=390,1200",
            &format!("--screenshot={}", phone.display()),
        ],
        &format!("{}/", up.url()),
    );
    assert!(palette_pixels(&std::fs::read(&phone).unwrap()).2 >= 8);

    // The detail page of one fractal.
    let view = client.get(created[0]).await.unwrap();
    let detail = chromium(
        &profile,
        &["--dump-dom"],
        &format!("{}/view/{}", up.url(), view.uuid),
    );
    assert!(
        detail.contains(view.checksum.as_deref().unwrap())
            && detail.contains("data-loaded=\"yes\"")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn unfinished_fractals_show_their_state_and_the_page_notices_changes() {
    let dir = tempfile::tempdir().unwrap();
    let profile = dir.path().join("chromium-profile");
    // No workers: everything stays queued.
    let up = spawn_up(dir.path(), "up", 0);
    let client = client(up.url());
    let signature = || async {
        reqwest::get(format!("{}/index/1/signature", up.url()))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let empty = signature().await;
    let uuid = client.create(&fractal(300, 200, 64)).await.unwrap().uuid;
    assert_ne!(
        signature().await,
        empty,
        "a new fractal changes what page 1 shows"
    );

    let dom = chromium(&profile, &["--dump-dom"], &format!("{}/", up.url()));
    assert!(dom.contains("queued, waiting for a worker"), "{dom}");
    assert!(
        !dom.contains("<img"),
        "no broken image for a fractal without one"
    );
    assert!(
        dom.contains("data-signature-url=\"/index/1/signature\"")
            && dom.contains("/static/gallery.js")
    );

    let missing = reqwest::get(format!("{}/view/{}", up.url(), uuid::Uuid::new_v4()))
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    assert!(
        missing
            .text()
            .await
            .unwrap()
            .contains("There is no fractal")
    );
    let bad = reqwest::get(format!("{}/index/zero", up.url()))
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    client.delete(uuid).await.unwrap();
}

/// How long the page took to draw (from navigation to every picture decoded and two
/// frames painted) and how many bytes it transferred (document, style, script, pictures).
const DRAWN_AND_WEIGHED: &str = r#"(async () => {
    await Promise.all([...document.images].map(image => image.decode()));
    await new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)));
    const entries = [
        ...performance.getEntriesByType("navigation"),
        ...performance.getEntriesByType("resource"),
    ];
    return {
        drawn_ms: performance.now(),
        bytes: entries.reduce((sum, entry) => sum + entry.transferSize, 0),
        images: document.images.length,
        loaded: [...document.images].filter(image => image.complete && image.naturalWidth > 0).length,
    };
})()"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_page_of_huge_fractals_is_light_because_it_shows_previews() {
    let dir = tempfile::tempdir().unwrap();
    let up = spawn_up(dir.path(), "up", 2);
    let client = client(up.url());
    let mut created = Vec::new();
    for _ in 0..5 {
        created.push(client.create(&fractal(9999, 9999, 256)).await.unwrap().uuid);
    }
    let mut full_bytes = 0;
    for uuid in &created {
        let done =
            wait_for_state(&client, *uuid, FractalState::Done, Duration::from_secs(300)).await;
        full_bytes += done.size.unwrap();
    }

    let mut browser = DevTools::launch(&dir.path().join("chromium-profile"));
    browser.open(&format!("{}/", up.url()));
    let page = browser.evaluate(DRAWN_AND_WEIGHED);
    let (bytes, drawn_ms) = (
        page["bytes"].as_u64().unwrap(),
        page["drawn_ms"].as_f64().unwrap(),
    );
    println!(
        "gallery page of five 9999x9999 fractals: {:.0} KB transferred, drawn in {:.0} ms (the five images themselves: {:.1} MB)",
        bytes as f64 / 1e3,
        drawn_ms,
        full_bytes as f64 / 1e6
    );
    assert_eq!(
        (page["images"].as_u64(), page["loaded"].as_u64()),
        (Some(5), Some(5)),
        "{page}"
    );
    assert!(bytes > 5 * 1000, "the pictures were counted: {page}");
    assert!(
        bytes < 1_000_000,
        "a page of previews weighs under 1 MB: {page}"
    );
    // Every picture is the fractal's preview; each links to its full image.
    let sources = browser.evaluate(
        "[...document.querySelectorAll('a.picture')].map(a => [a.getAttribute('href'), a.querySelector('img').getAttribute('src')])",
    );
    for pair in sources.as_array().unwrap() {
        let (href, src) = (pair[0].as_str().unwrap(), pair[1].as_str().unwrap());
        assert_eq!(src, format!("{href}/preview"), "{sources}");
    }
}

/// The status page in a real browser: green while a probe's rounds succeed, every node
/// listed with its state; red once renders stop (the only worker killed), with the failed
/// round drawn in the plot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_nodes_and_turns_red_when_users_fractals_stop() {
    let dir = tempfile::tempdir().unwrap();
    let profile = dir.path().join("chromium-profile");
    let api = spawn_api(dir.path(), "api", &[]);
    let mut worker = spawn_worker(dir.path(), "worker-1", api.url());
    let _probe = Process::spawn_server(
        dir.path(),
        "probe",
        &[
            "--endpoint-url",
            api.url(),
            "probe",
            "--interval",
            "0.2",
            "--deadline",
            "1",
            "--worker-token",
            TOKEN,
            "--name",
            "test-probe",
            "--bind",
            "127.0.0.1:0",
        ],
    );
    let status_url = format!("{}/status", api.url());
    let page = || chromium(&profile, &["--dump-dom"], &status_url);

    let green = wait_for("a green status page", Duration::from_secs(30), || async {
        let dom = page();
        (dom.contains(r#"data-colour="green""#)
            && dom.matches(r#"class="probe-ok""#).count() >= 2
            && dom.contains("worker-1"))
        .then_some(dom)
    })
    .await;
    assert!(green.contains("users' fractals are made"), "{green}");
    assert!(green.contains("(test-probe)"), "{green}");
    for role in ["api", "worker"] {
        assert!(
            green.contains(&format!("<td>{role}</td>")),
            "{role} listed: {green}"
        );
    }
    assert!(green.contains(r#"<span class="pill pill-green">UP</span>"#));

    worker.kill9();
    let red = wait_for("a red status page", Duration::from_secs(30), || async {
        let dom = page();
        dom.contains(r#"data-colour="red""#).then_some(dom)
    })
    .await;
    assert!(red.contains("the latest probe failed"), "{red}");
    assert!(red.contains("FAILED at render"), "{red}");
    assert!(red.contains(r#"class="probe-failed""#), "{red}");
    chromium(
        &profile,
        &[
            &format!("--screenshot={}", dir.path().join("status.png").display()),
            "--window-size=1000,1200",
        ],
        &status_url,
    );
    let png = std::fs::read(dir.path().join("status.png")).expect("a screenshot");
    // The banner's red (#c9302c), give or take the browser's colour handling.
    let red_pixels = rgb_pixels(&png)
        .iter()
        .filter(|[r, g, b]| r.abs_diff(0xc9) < 6 && g.abs_diff(0x30) < 6 && b.abs_diff(0x2c) < 6)
        .count();
    assert!(
        red_pixels > 10_000,
        "the red banner is drawn: {red_pixels} red pixels"
    );
}
