//! Child `settle` processes for benchmarks: real processes on real ports, so a benchmark
//! measures what a deployment runs.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::config::Config;

/// What every benchmark database's name begins with: a benchmark owns its database and may
/// empty, reload or drop it, so it refuses any other.
pub const DATABASE_PREFIX: &str = "settle_bench";

/// What a benchmark runs with, and starts every child `settle` process with.
#[derive(Debug, Clone)]
pub struct Setup {
    /// The loaded configuration; its URL names the benchmark's database once
    /// [`Setup::on_database`] has pointed it there.
    pub config: Config,
    /// The `--config` (or `SETTLE_CONFIG`) file it was loaded from: the children load it too, so
    /// they run with the settings the benchmark prints.
    config_file: Option<PathBuf>,
}

impl Setup {
    pub fn new(config: Config, config_file: Option<PathBuf>) -> Self {
        Self {
            config,
            config_file,
        }
    }

    /// This setup with its database URL pointed at `database`, which must be a benchmark's
    /// (see [`ensure_bench_database`]).
    pub fn on_database(mut self, database: &str) -> anyhow::Result<Self> {
        let url = &mut self.config.database.url;
        *url = with_database(url, database).context("database.url")?;
        ensure_bench_database(url)?;
        Ok(self)
    }

    /// `settle <subcommand>` with this setup's configuration file and database, logging at
    /// `log` to this process' stderr or (`piped`) to a pipe the caller reads; killed when
    /// dropped. Every child process of the benchmarks starts here.
    pub fn command(&self, subcommand: &str, log: &str, piped: bool) -> anyhow::Result<Command> {
        let mut command = Command::new(std::env::current_exe()?);
        if let Some(file) = &self.config_file {
            command.arg("--config").arg(file);
        }
        command
            .arg(subcommand)
            // The configuration's last layer (`config::env_layer`): an exported DATABASE_URL
            // would otherwise win over the benchmark's database, SETTLE_DATABASE__URL included.
            .env("DATABASE_URL", &self.config.database.url)
            .env("SETTLE_LOG", log)
            .stdout(Stdio::null())
            .stderr(if piped {
                Stdio::piped()
            } else {
                Stdio::inherit()
            })
            .kill_on_drop(true);
        Ok(command)
    }
}

/// Refuses `url` unless the database it connects to (its path, or a `dbname` parameter that
/// overrides it) is named [`DATABASE_PREFIX`]`*`.
pub fn ensure_bench_database(url: &str) -> anyhow::Result<()> {
    let options = crate::db::connect_options(url)?;
    let name = options
        .get_database()
        .context("database.url names no database")?;
    anyhow::ensure!(
        name.starts_with(DATABASE_PREFIX),
        "refusing database {name}: a benchmark empties and reloads its database, so it runs only \
         on one named {DATABASE_PREFIX}* (--database)"
    );
    Ok(())
}

/// `url` naming `database` instead of its own.
pub fn with_database(url: &str, database: &str) -> anyhow::Result<String> {
    let mut url = url::Url::parse(url)?;
    url.set_path(database);
    Ok(url.to_string())
}

/// Drops the benchmark database so every run starts from the same state; `cli::open`
/// recreates and migrates it.
pub async fn recreate_database(config: &Config) -> anyhow::Result<()> {
    ensure_bench_database(&config.database.url)?;
    crate::db::drop_database_if_exists(&config.database.url).await?;
    Ok(())
}

/// An HTTP client that sends a fresh admin token (created through [`crate::tokens::create`])
/// with every request, as a real client of the API must.
pub async fn admin_client(
    pool: &sqlx::PgPool,
    builder: reqwest::ClientBuilder,
) -> anyhow::Result<reqwest::Client> {
    let mut conn = pool.acquire().await?;
    let new = crate::tokens::NewToken::admin("settle bench");
    let (_, secret) = crate::tokens::create(&mut conn, &new).await?;
    let mut bearer = reqwest::header::HeaderValue::try_from(format!("Bearer {}", secret.expose()))?;
    bearer.set_sensitive(true);
    let headers = reqwest::header::HeaderMap::from_iter([(reqwest::header::AUTHORIZATION, bearer)]);
    Ok(builder.default_headers(headers).build()?)
}

/// A `settle api` child process on a free port.
pub struct ApiProcess {
    child: Child,
    pub base_url: String,
}

impl ApiProcess {
    /// Starts `settle api` on `setup`'s database and waits until it is ready.
    pub async fn start(setup: &Setup) -> anyhow::Result<Self> {
        Self::start_with(setup, &[]).await
    }

    /// [`Self::start`] with extra environment variables (configuration overrides).
    pub async fn start_with(setup: &Setup, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let mut child = setup
            .command("api", "warn,settle=info", true)?
            .envs(env.iter().copied())
            .env("PORT", "0")
            .spawn()
            .context("starting settle api")?;
        let stderr = child.stderr.take().context("api stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        let base_url = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await? {
                if let Some(url) = listening_url(&line) {
                    return anyhow::Ok(url);
                }
            }
            anyhow::bail!("settle api exited before listening")
        })
        .await
        .context("settle api did not start within 30 s")??;
        // Keep draining its log so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self { child, base_url })
    }

    /// SIGTERM, then wait for the graceful exit.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(pid) = self.child.id() {
            Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await?;
        }
        tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await??;
        Ok(())
    }
}

/// POSTs `body` as JSON to `url` and returns the JSON answer, failing on an error status.
pub async fn post_json(
    http: &reqwest::Client,
    url: String,
    body: &serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    let answer = http.post(url).json(body).send().await?.error_for_status()?;
    Ok(answer.json().await?)
}

/// The URL in the API's "listening on http://…" log line, without trailing fields or colours.
pub fn listening_url(line: &str) -> Option<String> {
    let at = line.find("listening on http://")? + "listening on ".len();
    let url: String = line[at..]
        .chars()
        .take_while(|c| !c.is_whitespace() && *c != '\x1b')
        .collect();
    Some(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_benchmark_database_is_accepted() {
        let url = "postgres://postgres@127.0.0.1:5432/";
        assert!(ensure_bench_database(&format!("{url}settle_bench_queue")).is_ok());
        let refused = ensure_bench_database(&format!("{url}settle")).unwrap_err();
        assert!(refused.to_string().contains("settle_bench*"), "{refused}");
        // A `dbname` parameter overrides the path: the name checked is the one connected to.
        assert!(ensure_bench_database(&format!("{url}settle_bench_x?dbname=settle")).is_err());
    }
}
