//! First contact on a machine where PostgreSQL is installed but not running: `serve` starts a
//! private cluster of its own, says so, serves, and stops the cluster when it exits; where no
//! server is installed, it says what to install or which `DATABASE_URL` to set.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::Signal;
use settle::local_cluster::{bin_dir, pg_command};
use tokio::io::{AsyncBufReadExt, BufReader};

/// A scratch directory for a private cluster's data; on drop, stops a server still running
/// there (a failed test) and deletes it.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Self {
        let dir =
            std::env::temp_dir().join(format!("settle-first-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir(&dir).expect("scratch dir");
        Self(dir)
    }

    fn data(&self) -> PathBuf {
        self.0.join("data")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(bin) = bin_dir().filter(|_| self.data().join("postmaster.pid").exists()) {
            let data = self.data().to_string_lossy().into_owned();
            let _ = pg_command(&bin.join("pg_ctl"), &self.0)
                .args(["-D", &data, "-m", "immediate", "-w", "stop"])
                .output();
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `settle serve` for a database URL on `port` of 127.0.0.1 with `database.local_cluster` set
/// on as well: a URL the user names is used as given unless they ask for a private cluster
/// there too (the built-in URL's port, 5432, is the test server's).
fn serve(port: u16, data: &Path) -> tokio::process::Command {
    let mut command = serve_with(data);
    command
        .env(
            "SETTLE_DATABASE__URL",
            format!("postgres://postgres@127.0.0.1:{port}/settle"),
        )
        .env("SETTLE_DATABASE__LOCAL_CLUSTER", "true");
    command
}

/// `settle serve` with a private cluster's data in `data`, naming no database URL.
fn serve_with(data: &Path) -> tokio::process::Command {
    let mut command = tokio::process::Command::from(common::settle_command());
    command
        .arg("serve")
        .env("SETTLE_DATABASE__LOCAL_DATA_DIR", data)
        .env("PORT", "0")
        .env("SETTLE_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// Runs `command`, asserts it failed (within 60 s), and returns what it said on stderr.
async fn fails_saying(command: &mut tokio::process::Command) -> String {
    let output = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("serve fails rather than serving")
        .expect("run serve");
    assert!(!output.status.success());
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().expect("bound").port()
}

fn answers(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

#[tokio::test]
async fn serve_starts_a_private_cluster_when_nothing_answers_and_stops_it_on_exit() {
    if bin_dir().is_none() {
        panic!("this test needs the PostgreSQL server binaries (apt-get install postgresql)");
    }
    let (scratch, port) = (Scratch::new(), free_port());
    let mut child = serve(port, &scratch.data()).spawn().expect("spawn serve");
    let (base, before, _log) = common::listening::base_url(&mut child).await;
    let said = before.join("\n");
    assert!(said.contains("private PostgreSQL cluster"), "{said}");
    assert!(
        answers(port),
        "the private cluster listens on the URL's port"
    );
    let ready = reqwest::get(format!("{base}/readyz"))
        .await
        .expect("readyz");
    assert_eq!(
        ready.status(),
        200,
        "migrated and ready on the private cluster"
    );

    ends_with_its_cluster(child, Signal::SIGTERM, port, &scratch).await;
}

/// Sends `signal` to `serve` (`child`), which then exits successfully within 60 s, its
/// private cluster (on `port`, its data in `scratch`) stopped.
async fn ends_with_its_cluster(
    mut child: tokio::process::Child,
    signal: Signal,
    port: u16,
    scratch: &Scratch,
) {
    let pid = nix::unistd::Pid::from_raw(child.id().expect("pid") as i32);
    nix::sys::signal::kill(pid, signal).expect("signal serve");
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .expect("serve exits within 60 s")
        .expect("wait");
    assert!(status.success(), "{status}");
    assert!(!answers(port), "the cluster stopped with serve");
    assert!(!scratch.data().join("postmaster.pid").exists());
}

#[tokio::test]
async fn without_a_server_installed_serve_says_what_to_install_or_set() {
    let (scratch, port) = (Scratch::new(), free_port());
    let empty_bin = scratch.0.join("bin");
    std::fs::create_dir(&empty_bin).expect("empty bin dir");
    let mut command = serve(port, &scratch.data());
    let said = fails_saying(command.env("SETTLE_DATABASE__LOCAL_BIN_DIR", &empty_bin)).await;
    assert!(said.contains("apt-get install postgresql"), "{said}");
    assert!(said.contains("DATABASE_URL"), "{said}");
    // The directory given is named, with its key: a wrong one is not "nothing installed".
    let named = format!("database.local_bin_dir ({})", empty_bin.display());
    assert!(said.contains(&named), "{said}");
    assert!(!answers(port));
}

/// A URL named anywhere (`DATABASE_URL`, `SETTLE_DATABASE__URL`, a `--config` file) is used
/// as given: nothing answering there is an error naming it, not a private cluster made there.
#[tokio::test]
async fn a_database_url_the_user_named_is_used_as_given() {
    let (scratch, port) = (Scratch::new(), free_port());
    let url = format!("postgres://postgres@127.0.0.1:{port}/settle");
    let file = scratch.0.join("settle.toml");
    std::fs::write(&file, format!("[database]\nurl = \"{url}\"\n")).expect("config file");
    for how in ["DATABASE_URL", "SETTLE_DATABASE__URL", "--config"] {
        let mut command = serve_with(&scratch.data());
        match how {
            "--config" => command.arg("--config").arg(&file),
            variable => command.env(variable, &url),
        };
        let said = fails_saying(&mut command).await;
        assert!(
            said.contains("cannot connect") && said.contains(&format!("127.0.0.1:{port}")),
            "{how}: {said}"
        );
        assert!(!scratch.data().exists(), "{how}: no cluster was made");
    }
}

/// Run as root under a directory closed to other users (root's home is 0700), the private
/// cluster's `postgres` user cannot reach its data directory: `serve` says so and what to set,
/// and leaves nothing behind.
#[tokio::test]
async fn a_data_directory_the_postgres_user_cannot_reach_is_named_with_the_way_out() {
    if !settle::local_cluster::running_as_root() {
        return; // Not root: serve runs the cluster as this user, who can reach its own files.
    }
    let (scratch, port) = (Scratch::new(), free_port());
    let closed = scratch.0.join("home");
    std::fs::create_dir(&closed).expect("a closed directory");
    std::fs::set_permissions(&closed, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .expect("chmod 700");
    let data = closed.join("project/.settle/postgres");
    let said = fails_saying(&mut serve(port, &data)).await;
    assert!(said.contains("cannot reach"), "{said}");
    assert!(said.contains("local_data_dir"), "{said}");
    assert!(!closed.join("project").exists(), "what serve made is gone");
    assert!(!answers(port));
}

/// A signal while `serve --demo` is still starting (here while it loads the demo data) ends it
/// and stops the private cluster it started, as after serving. Before, the signal handlers
/// were installed only once the start was over: Ctrl-C killed `serve` and left the cluster
/// running, and the next `serve` used it and never stopped it either.
#[tokio::test]
async fn a_signal_during_the_start_stops_the_private_cluster_too() {
    if bin_dir().is_none() {
        panic!("this test needs the PostgreSQL server binaries (apt-get install postgresql)");
    }
    let (scratch, port) = (Scratch::new(), free_port());
    let mut child = serve(port, &scratch.data())
        .arg("--demo")
        .spawn()
        .expect("spawn serve");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr piped")).lines();
    let mut said = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.expect("read log") {
            let loading = line.contains("loading demo data");
            said.push(line);
            if loading {
                return;
            }
        }
        panic!("exited before loading demo data:\n{}", said.join("\n"));
    })
    .await
    .expect("loading demo data within 60 s");
    ends_with_its_cluster(child, Signal::SIGINT, port, &scratch).await;
}
