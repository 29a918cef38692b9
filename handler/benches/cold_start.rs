//! Cold start of the custom handler, as the Functions host experiences it: from exec of the
//! binary to the first answer on `GET /`, polled as fast as the connection allows. Also the
//! binary's size and the process's resident memory once idle.
//!
//!     cargo bench -p handler --bench cold_start
//!
//! Prints the figures; asserts nothing (targets are judged by people, not by a timed test).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const RUNS: usize = 20;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn ready(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let request = format!("GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    let mut answer = Vec::new();
    stream.write_all(request.as_bytes()).is_ok()
        && stream.read_to_end(&mut answer).is_ok()
        && answer.starts_with(b"HTTP/1.1 200")
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn main() {
    let binary = env!("CARGO_BIN_EXE_handler");
    let data_dir = tempfile::tempdir().unwrap();
    let mut samples = Vec::with_capacity(RUNS);
    let mut idle_rss = Vec::new();
    for run in 0..=RUNS {
        let port = free_port();
        let started = Instant::now();
        let mut child = Command::new(binary)
            .env("FUNCTIONS_CUSTOMHANDLER_PORT", port.to_string())
            .env("FUNC_SYNC_DATA_DIR", data_dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = started + Duration::from_secs(10);
        while !ready(port) {
            assert!(Instant::now() < deadline, "no answer on GET / within 10 s");
        }
        let elapsed = started.elapsed();
        // The first run creates the data directory's databases; it is not a cold start of an
        // installed app, so it is left out.
        if run > 0 {
            samples.push(elapsed);
            std::thread::sleep(Duration::from_millis(200));
            if let Some(kib) = rss_kib(child.id()) {
                idle_rss.push(kib);
            }
        }
        child.kill().unwrap();
        child.wait().unwrap();
    }
    samples.sort();
    idle_rss.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let size = std::fs::metadata(binary).unwrap().len();
    println!("cold start (exec to first GET / answer), {RUNS} runs:");
    println!(
        "  median {:.2} ms, min {:.2} ms, max {:.2} ms",
        ms(samples[RUNS / 2]),
        ms(samples[0]),
        ms(samples[RUNS - 1])
    );
    println!("binary: {binary}");
    println!("  size {:.1} MiB", size as f64 / (1024.0 * 1024.0));
    if let Some(median) = idle_rss.get(idle_rss.len() / 2) {
        println!(
            "idle RSS after readiness: median {:.1} MiB",
            *median as f64 / 1024.0
        );
    }
}
