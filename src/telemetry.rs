//! Logging: `tracing` to stderr, filtered by `SETTLE_LOG` (default `info`), as JSON when
//! `SETTLE_LOG_FORMAT=json` (`text`, the default, otherwise). Every request's lines carry its
//! request id through its span.

use std::io::IsTerminal;

use anyhow::{Context, bail};
use tracing_subscriber::EnvFilter;

/// Sets up the log; refuses, before anything runs, a `SETTLE_LOG` that is not a filter or a
/// `SETTLE_LOG_FORMAT` it does not know, as configuration refuses a bad value: a typo there
/// would otherwise leave the log silently other than asked.
pub fn init() -> anyhow::Result<()> {
    let filter = match std::env::var("SETTLE_LOG") {
        Ok(directives) => EnvFilter::try_new(&directives)
            .with_context(|| format!("SETTLE_LOG={directives:?} is not a log filter"))?,
        Err(_) => EnvFilter::new("info,sqlx=warn,tower_http=info"),
    };
    let json = match std::env::var("SETTLE_LOG_FORMAT").as_deref() {
        Err(_) | Ok("text") => false,
        Ok("json") => true,
        Ok(other) => bail!("SETTLE_LOG_FORMAT={other:?}: it is `json` or `text` (the default)"),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours for a terminal only, not for a log file or `docker logs`.
        .with_ansi(std::io::stderr().is_terminal());
    // A second init (tests calling into the library twice) is harmless: keep the first.
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
    Ok(())
}
