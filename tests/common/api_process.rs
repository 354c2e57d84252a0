//! A real `settle` child process serving the API (`api`, or `serve --demo`) on port 0, for
//! tests that go through the binary as an operator does.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The child (killed when dropped), where it listens, and what it printed on stdout.
pub struct ApiChild {
    _child: Child,
    pub pid: i32,
    pub base: String,
    pub stdout: Vec<String>,
}

/// Runs `settle <args>` on `database_url` with `env` and waits (30 s at most) until it listens.
pub async fn start(database_url: &str, args: &[&str], env: &[(&str, &str)]) -> ApiChild {
    let mut child = Command::from(super::settle_command())
        .args(args)
        .envs(env.iter().copied())
        .env("SETTLE_DATABASE__URL", database_url)
        .env("PORT", "0")
        .env("SETTLE_LOG", "warn,settle=info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn settle");
    let pid = child.id().expect("a pid") as i32;
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let base = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = stderr.next_line().await.unwrap() {
            if let Some(url) = settle::bench::process::listening_url(&line) {
                return url;
            }
        }
        panic!("settle {args:?} exited without listening");
    })
    .await
    .expect("listening within 60 s");
    tokio::spawn(async move { while let Ok(Some(_)) = stderr.next_line().await {} });
    // Whatever it printed before listening (serve prints its token first).
    let mut printed = Vec::new();
    while let Ok(Ok(Some(line))) =
        tokio::time::timeout(Duration::from_millis(200), stdout.next_line()).await
    {
        printed.push(line);
    }
    ApiChild {
        _child: child,
        pid,
        base,
        stdout: printed,
    }
}
