//! First contact without a running server: when `serve` finds nothing answering at a loopback
//! database URL and the PostgreSQL server binaries are installed, it starts a private cluster
//! of its own (`initdb` once into `database.local_data_dir`, then `pg_ctl start`), says so, and
//! stops it when `serve` exits. The README's first command thus works where Postgres is
//! installed but not running; where it is not installed, the error says what to install or which
//! `DATABASE_URL` to set.
//!
//! Only `serve` does this, only when `database.local_cluster` is on, which by default it is for
//! the built-in URL alone: a URL the user named (`DATABASE_URL`, `SETTLE_DATABASE__URL`, a
//! config file) is used as given, unless they set `local_cluster` too (see
//! [`crate::config::Config::from_figment`]). The test suite's private clusters use the same
//! binaries through [`bin_dir`] and [`pg_command`].

use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;

use crate::config::DatabaseConfig;

/// `initdb`'s options for a private cluster: the `postgres` superuser, trusted (it listens on
/// loopback only), UTF-8 with the C locale.
pub const INITDB_OPTIONS: [&str; 7] = ["-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C"];

#[derive(Debug, thiserror::Error)]
pub enum LocalClusterError {
    #[error(
        "nothing answers at {url} and no PostgreSQL server is installed to start one there: \
         install it (Debian/Ubuntu: `apt-get install postgresql`, macOS: `brew install postgresql`) \
         or set DATABASE_URL to a reachable server"
    )]
    NotInstalled { url: String },
    #[error(
        "nothing answers at {url}, and database.local_bin_dir ({dir}) holds no initdb to start a \
         private cluster there: set it to the server's bin directory (e.g. \
         /usr/lib/postgresql/15/bin) or unset it to search the usual places, install the server \
         (Debian/Ubuntu: `apt-get install postgresql`), or set DATABASE_URL to a reachable server"
    )]
    NoInitdb { url: String, dir: String },
    #[error("could not start a private PostgreSQL cluster in {dir}: {what}")]
    Start { dir: String, what: String },
}

/// A cluster this process started; [`LocalCluster::stop`] (or dropping it) stops it again.
#[derive(Debug)]
pub struct LocalCluster {
    /// The server's `bin` directory (`pg_ctl`).
    bin: PathBuf,
    /// The data directory, absolute: `pg_ctl` runs with another working directory.
    data: PathBuf,
    /// Whether it still runs (stopped once, by `stop` or by drop).
    running: bool,
}

/// Starts a private cluster for `config.url` when `serve` should (see the module docs); `None`
/// when a server answers or the URL is not ours to serve.
pub async fn start_if_needed(
    config: &DatabaseConfig,
) -> Result<Option<LocalCluster>, LocalClusterError> {
    let Some(port) = loopback_port(config) else {
        return Ok(None);
    };
    if answers(port) {
        return Ok(None);
    }
    let url = crate::db::redact(&config.url);
    let bin = match &config.local_bin_dir {
        Some(dir) => Some(PathBuf::from(dir))
            .filter(|d| d.join("initdb").is_file())
            .ok_or_else(|| LocalClusterError::NoInitdb {
                url: url.clone(),
                dir: dir.clone(),
            })?,
        None => bin_dir().ok_or(LocalClusterError::NotInstalled { url: url.clone() })?,
    };
    let data = std::path::absolute(&config.local_data_dir)
        .map_err(|e| start_error(&config.local_data_dir, e))?;
    let mut cluster = LocalCluster {
        bin,
        data,
        running: false,
    };
    cluster.start(port).await?;
    cluster.running = true;
    tracing::warn!(
        %url,
        data_dir = %cluster.data.display(),
        "nothing answered at the database url, so serve started a private PostgreSQL cluster there; \
         it stops when serve exits (name a server's url in DATABASE_URL to use that one instead)"
    );
    Ok(Some(cluster))
}

impl LocalCluster {
    async fn start(&self, port: u16) -> Result<(), LocalClusterError> {
        let data = self.data.to_string_lossy().into_owned();
        if !self.data.join("PG_VERSION").is_file() {
            // The first directory of the path that does not exist yet: what we create.
            let made = self
                .data
                .ancestors()
                .take_while(|dir| !dir.exists())
                .last()
                .map(Path::to_path_buf);
            std::fs::create_dir_all(&self.data).map_err(|e| start_error(&data, e))?;
            if running_as_root()
                && let Err(e) = self.hand_to_postgres()
            {
                if let Some(made) = made {
                    let _ = std::fs::remove_dir_all(made);
                }
                return Err(start_error(&data, e));
            }
            let initdb = [&["-D", &data][..], &INITDB_OPTIONS].concat();
            self.run("initdb", &self.bin.join("initdb"), &initdb)
                .await?;
        }
        // Loopback TCP only, and the socket inside the data dir, never the system server's.
        let options = format!("-c listen_addresses=127.0.0.1 -p {port} -k {data}");
        let log = self.data.join("server.log").to_string_lossy().into_owned();
        let start = [
            "-D", &data, "-l", &log, "-o", &options, "-w", "-t", "60", "start",
        ];
        self.run("pg_ctl start", &self.bin.join("pg_ctl"), &start)
            .await
    }

    /// Fast shutdown, waiting until the server is gone.
    pub async fn stop(mut self) {
        let data = self.data.to_string_lossy().into_owned();
        let stop = ["-D", &data, "-m", "fast", "-w", "-t", "60", "stop"];
        match self
            .run("pg_ctl stop", &self.bin.join("pg_ctl"), &stop)
            .await
        {
            Ok(()) => tracing::info!(data_dir = %data, "stopped the private PostgreSQL cluster"),
            Err(e) => tracing::error!("{e}"),
        }
        self.running = false;
    }

    /// Gives the new data directory to the `postgres` user, which runs the cluster when we are
    /// root, and checks that it can reach it: a directory above it that others cannot search
    /// (root's home, 0700) stops `initdb` with a bare "Permission denied".
    fn hand_to_postgres(&self) -> Result<(), String> {
        let chown = std::process::Command::new("chown")
            .arg("-R")
            .arg("postgres:postgres")
            .arg(&self.data)
            .status();
        if !chown.is_ok_and(|s| s.success()) {
            return Err("chown to the postgres user failed".into());
        }
        let reachable = pg_command(Path::new("test"), Path::new("/"))
            .arg("-w")
            .arg(&self.data)
            .status();
        if !reachable.is_ok_and(|s| s.success()) {
            return Err(
                "the postgres user, which runs the cluster when serve runs as root, cannot reach \
                 it (a directory above it is closed to other users, as root's home is): set \
                 database.local_data_dir (SETTLE_DATABASE__LOCAL_DATA_DIR) to a directory it can \
                 reach, such as /var/tmp/settle, or set DATABASE_URL"
                    .into(),
            );
        }
        Ok(())
    }

    async fn run(
        &self,
        what: &str,
        program: &Path,
        args: &[&str],
    ) -> Result<(), LocalClusterError> {
        let dir = self.data.to_string_lossy().into_owned();
        let mut command = tokio::process::Command::from(pg_command(program, &self.data));
        let output = command
            .args(args)
            .output()
            .await
            .map_err(|e| start_error(&dir, e))?;
        if output.status.success() {
            return Ok(());
        }
        Err(LocalClusterError::Start {
            dir,
            what: format!(
                "{what} failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        })
    }
}

impl Drop for LocalCluster {
    /// `serve` stops the cluster itself; this covers an early return on an error.
    fn drop(&mut self) {
        if self.running {
            let data = self.data.to_string_lossy().into_owned();
            let _ = pg_command(&self.bin.join("pg_ctl"), &self.data)
                .args(["-D", &data, "-m", "fast", "-w", "-t", "60", "stop"])
                .output();
        }
    }
}

/// The port of `config.url` when serve may start a cluster for it: `database.local_cluster`
/// on and the host a loopback address.
fn loopback_port(config: &DatabaseConfig) -> Option<u16> {
    if !config.local_cluster {
        return None;
    }
    let options: PgConnectOptions = config.url.parse().ok()?;
    matches!(options.get_host(), "127.0.0.1" | "localhost").then(|| options.get_port())
}

fn answers(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok()
}

/// The `bin` dir of the newest PostgreSQL installed under `/usr/lib/postgresql/*/bin` (Debian's
/// layout) that has `initdb`, else the directory of an `initdb` on `PATH`.
pub fn bin_dir() -> Option<PathBuf> {
    let debian = std::fs::read_dir("/usr/lib/postgresql")
        .ok()
        .and_then(|versions| {
            versions
                .filter_map(|entry| {
                    let entry = entry.ok()?;
                    let major: u32 = entry.file_name().to_str()?.parse().ok()?;
                    let bin = entry.path().join("bin");
                    bin.join("initdb").is_file().then_some((major, bin))
                })
                .max_by_key(|(major, _)| *major)
                .map(|(_, bin)| bin)
        });
    debian.or_else(|| {
        std::env::split_paths(&std::env::var_os("PATH")?)
            .find(|dir| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file())
    })
}

/// `program` run in `dir`, as the `postgres` OS user when we are root (`initdb` and the server
/// refuse to run as root).
pub fn pg_command(program: &Path, dir: &Path) -> std::process::Command {
    let mut command = if running_as_root() {
        let mut c = std::process::Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        std::process::Command::new(program)
    };
    command.current_dir(dir).stdin(std::process::Stdio::null());
    command
}

pub fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn start_error(dir: &str, e: impl std::fmt::Display) -> LocalClusterError {
    LocalClusterError::Start {
        dir: dir.to_owned(),
        what: e.to_string(),
    }
}
