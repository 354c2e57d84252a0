//! A private Postgres cluster for tests that must stop or restart the server: `initdb` and
//! `pg_ctl` from the installed PostgreSQL, in a temp dir, on a free port, so the shared server
//! every other test uses is never disturbed. The server runs as the `postgres` OS user when the
//! tests run as root (initdb refuses root). Stopped with `-m immediate` and deleted on drop,
//! also when the test panics (its server log is printed then, for the post-mortem).

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use settle::local_cluster::{INITDB_OPTIONS, bin_dir, pg_command, running_as_root};

/// A running private cluster; stopped and deleted when dropped.
pub struct Cluster {
    /// The `bin` directory of the newest installed PostgreSQL.
    bin: PathBuf,
    /// Temp dir owned by the server's user: `data/`, `server.log` and the Unix socket.
    dir: PathBuf,
    /// Free TCP port on 127.0.0.1 the server listens on.
    port: u16,
}

impl Cluster {
    /// `initdb`s and starts a cluster; `None` (the caller skips, and this says so) when no
    /// PostgreSQL server is installed under `/usr/lib/postgresql/*/bin`.
    pub async fn start() -> Option<Self> {
        Self::start_with(&INITDB_OPTIONS).await
    }

    /// [`Cluster::start`] with `initdb_options` in place of settle's own (say, another
    /// encoding).
    pub async fn start_with(initdb_options: &[&str]) -> Option<Self> {
        let Some(bin) = bin_dir() else {
            eprintln!(
                "SKIPPED: no initdb under /usr/lib/postgresql/*/bin (install the postgresql \
                 package to run this test)"
            );
            return None;
        };
        let cluster = Self::new_dir(bin);
        let data = cluster.data();
        let initdb = [&["-D", &data][..], initdb_options, &["--no-sync"]].concat();
        cluster.run("initdb", &initdb).await;
        cluster.start_again().await;
        Some(cluster)
    }

    /// A hot standby of `primary`: `pg_basebackup` of its data with a streaming-replication
    /// configuration (`-R`), started on a port of its own. It replays everything the primary
    /// commits (databases made later included) and answers read-only queries.
    pub async fn standby_of(primary: &Cluster) -> Self {
        let standby = Self::new_dir(primary.bin.clone());
        let (data, port) = (standby.data(), primary.port.to_string());
        standby
            .run(
                "pg_basebackup",
                &[
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port,
                    "-U",
                    "postgres",
                    "-D",
                    &data,
                    "-R",
                    "-c",
                    "fast",
                    "-X",
                    "stream",
                    "--no-sync",
                ],
            )
            .await;
        standby.start_again().await;
        standby
    }

    /// A new, empty cluster dir (owned by the server's user) on a free port.
    fn new_dir(bin: PathBuf) -> Self {
        let dir = std::env::temp_dir().join(format!("settle-pg-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir(&dir).expect("cluster temp dir");
        // From here on a failure still deletes the dir.
        let cluster = Self {
            bin,
            dir,
            port: free_port(),
        };
        if running_as_root() {
            let chown = std::process::Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&cluster.dir)
                .output()
                .expect("run chown");
            cluster.check("chown", chown);
        }
        cluster
    }

    /// `host:port` of this cluster's server.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// A URL for database `name` on this cluster.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// Starts the (stopped) server and waits until it accepts connections.
    pub async fn start_again(&self) {
        let (data, log, options) = (self.data(), self.log(), self.options());
        self.run(
            "pg_ctl",
            &[
                "-D", &data, "-l", &log, "-o", &options, "-w", "-t", "90", "start",
            ],
        )
        .await;
    }

    /// Fast shutdown (every session terminated with 57P01, a shutdown checkpoint), waiting
    /// until the server is gone.
    pub async fn stop(&self) {
        self.stop_as("fast").await;
    }

    /// Immediate shutdown (a crash: no checkpoint, what the WAL writer has not written is
    /// lost), waiting until the server is gone.
    pub async fn crash(&self) {
        self.stop_as("immediate").await;
    }

    async fn stop_as(&self, mode: &str) {
        let data = self.data();
        self.run(
            "pg_ctl",
            &["-D", &data, "-m", mode, "-w", "-t", "90", "stop"],
        )
        .await;
    }

    /// `pg_ctl restart -m fast`: a fast stop and a start at once, waiting until it accepts
    /// connections again.
    pub async fn restart(&self) {
        let (data, log, options) = (self.data(), self.log(), self.options());
        self.run(
            "pg_ctl",
            &[
                "-D", &data, "-l", &log, "-o", &options, "-m", "fast", "-w", "-t", "90", "restart",
            ],
        )
        .await;
    }

    /// Promotes this standby: it leaves recovery and takes no more of its primary's WAL.
    pub async fn promote(&self) {
        let data = self.data();
        self.run("pg_ctl", &["-D", &data, "-w", "-t", "90", "promote"])
            .await;
    }

    /// Freezes the server (SIGSTOP to the postmaster and every process it started: a hung
    /// host, whose connections stay open and answer nothing) until the guard drops.
    pub fn freeze(&self) -> Frozen {
        let postmaster = self.postmaster();
        let mut pids = vec![Pid::from_raw(postmaster)];
        pids.extend(children_of(postmaster).into_iter().map(Pid::from_raw));
        let frozen = Frozen { pids };
        frozen.signal(Signal::SIGSTOP);
        frozen
    }

    /// Freezes the server's WAL writer only (SIGSTOP) until the guard drops: commits made with
    /// `synchronous_commit = off` stay in the server's memory, lost in a crash, until a
    /// synchronous commit flushes them.
    pub fn freeze_wal_writer(&self) -> Frozen {
        let writer = children_of(self.postmaster())
            .into_iter()
            .find(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|cmdline| cmdline.contains("walwriter"))
            })
            .expect("the server's WAL writer");
        let frozen = Frozen {
            pids: vec![Pid::from_raw(writer)],
        };
        frozen.signal(Signal::SIGSTOP);
        frozen
    }

    /// The server's log so far.
    pub fn server_log(&self) -> String {
        std::fs::read_to_string(self.log()).unwrap_or_default()
    }

    fn postmaster(&self) -> i32 {
        let pid_file = std::fs::read_to_string(self.dir.join("data/postmaster.pid"))
            .expect("the server's postmaster.pid");
        pid_file
            .lines()
            .next()
            .and_then(|pid| pid.parse().ok())
            .expect("the postmaster's pid")
    }

    fn data(&self) -> String {
        self.dir.join("data").to_string_lossy().into_owned()
    }

    fn log(&self) -> String {
        self.dir.join("server.log").to_string_lossy().into_owned()
    }

    /// TCP on loopback only, and the socket in our own dir rather than the shared
    /// `/var/run/postgresql` of the system server.
    fn options(&self) -> String {
        format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {}",
            self.port,
            self.dir.display()
        )
    }

    /// `program` from the server's bin dir, as the `postgres` user when we are root; run in the
    /// cluster dir, since the server's user may not be able to read our working directory.
    fn command(&self, program: &str) -> std::process::Command {
        pg_command(&self.bin.join(program), &self.dir)
    }

    async fn run(&self, program: &str, args: &[&str]) {
        let mut command = tokio::process::Command::from(self.command(program));
        command.args(args);
        let output = tokio::time::timeout(Duration::from_secs(120), command.output())
            .await
            .unwrap_or_else(|_| panic!("{program} {args:?} did not finish within 120 s"))
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
        self.check(&format!("{program} {args:?}"), output);
    }

    fn check(&self, what: &str, output: Output) {
        assert!(
            output.status.success(),
            "{what} failed ({}):\n{}{}\nserver log:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            self.server_log()
        );
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "private cluster log ({}):\n{}",
                self.log(),
                self.server_log()
            );
        }
        if Path::new(&self.data()).join("postmaster.pid").exists() {
            let data = self.data();
            let _ = self
                .command("pg_ctl")
                .args(["-D", &data, "-m", "immediate", "-w", "-t", "60", "stop"])
                .output();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A port nothing listens on right now (the kernel hands out ephemeral ports in turn, so it is
/// not given to anyone else in the instant before the server binds it).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// The processes whose parent is `parent`, from `/proc`.
fn children_of(parent: i32) -> Vec<i32> {
    let entries = std::fs::read_dir("/proc").expect("read /proc");
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            // `pid (comm) state ppid …`; comm may hold spaces and parentheses.
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                let after_comm = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
                after_comm.split_whitespace().nth(1) == Some(&parent.to_string())
            })
        })
        .collect()
}

/// A frozen server's processes, woken (SIGCONT) when dropped.
pub struct Frozen {
    pids: Vec<Pid>,
}

impl Frozen {
    fn signal(&self, signal: Signal) {
        for &pid in &self.pids {
            // A session ending as it froze is reaped once the postmaster wakes.
            match kill(pid, signal) {
                Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                Err(e) => panic!("{signal} to {pid}: {e}"),
            }
        }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        self.signal(Signal::SIGCONT);
    }
}
