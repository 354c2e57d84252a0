//! `settle tokens create|list|revoke`: what an operator types and reads. A new token's secret
//! is printed once, alone on the last line of standard output, so scripts can take it with
//! `tail -n 1`; nothing ever prints a secret or a hash again.

use std::io::Write;

use anyhow::Context;
use clap::Subcommand;
use sqlx::PgPool;

use super::{NewToken, Role, TokenInfo};

#[derive(Debug, Subcommand)]
pub enum TokensCommand {
    /// Create a token; its secret is printed once, alone on the last line.
    Create {
        /// admin (everything), shop (read products; place and read orders), ingest (post
        /// transactions) or merchant (read its own settlements only).
        #[arg(long, value_parser = |s: &str| s.parse::<Role>())]
        role: Role,
        /// The merchant a merchant token reads; required for that role, refused for others.
        #[arg(long = "merchant")]
        merchant_id: Option<String>,
        /// A label for `tokens list`, e.g. the service that will use it.
        #[arg(long)]
        name: Option<String>,
    },
    /// List tokens (id, name, role, merchant, created, revoked); never their secrets.
    List,
    /// Revoke a token: it stops working within `auth.cache_ttl_ms`.
    Revoke {
        /// The id `tokens list` shows.
        id: i64,
    },
}

/// Runs one `tokens` command, writing what the operator reads to `out`.
pub async fn run(
    command: TokensCommand,
    pool: &PgPool,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let mut conn = pool.acquire().await?;
    match command {
        TokensCommand::Create {
            role,
            merchant_id,
            name,
        } => {
            let token = NewToken::new(role, merchant_id, name)?;
            // Committed only once its secret is written: a token whose secret nobody got (the
            // reader of the output gone, `| true`) would be live and of no use to anyone.
            let mut tx = sqlx::Connection::begin(&mut *conn).await?;
            let (info, secret) = super::create(&mut tx, &token).await?;
            let shown = writeln!(
                out,
                "created token {} ({}); it is shown only this once:",
                info.id,
                describe(&info)
            )
            .and_then(|()| writeln!(out, "{}", secret.expose()))
            .and_then(|()| out.flush());
            if let Err(e) = shown {
                // Said without the io::Error as its cause: a closed output is no success here.
                anyhow::bail!(
                    "the new token's secret could not be written to standard output ({e}); \
                     no token was created"
                );
            }
            tx.commit().await?;
        }
        TokensCommand::List => {
            let tokens = super::list(&mut conn).await?;
            writeln!(
                out,
                "{:>6}  {:<24}  {:<8}  {:<16}  {:<20}  revoked",
                "id", "name", "role", "merchant", "created"
            )?;
            for t in tokens {
                let time =
                    |at: chrono::DateTime<chrono::Utc>| at.format("%Y-%m-%d %H:%M:%S").to_string();
                writeln!(
                    out,
                    "{:>6}  {:<24}  {:<8}  {:<16}  {:<20}  {}",
                    t.id,
                    t.name.as_deref().unwrap_or("-"),
                    t.role,
                    t.merchant_id.as_deref().unwrap_or("-"),
                    time(t.created_at),
                    t.revoked_at.map_or_else(|| "-".to_owned(), time)
                )?;
            }
        }
        TokensCommand::Revoke { id } => {
            let info = super::revoke(&mut conn, id)
                .await
                .with_context(|| format!("revoking token {id}"))?;
            let at = info
                .revoked_at
                .map(|at| at.to_rfc3339())
                .unwrap_or_default();
            writeln!(out, "revoked token {id} ({}) at {at}", describe(&info))?;
        }
    }
    Ok(())
}

/// Whether this process's standard output is `/dev/null`: where `> /dev/null` sends it, and
/// where Rust's runtime points a standard output closed at start (`>&-`), so that writes to it
/// succeed. A secret written there is as lost as one written into a closed pipe.
pub fn stdout_discarded() -> bool {
    use std::os::fd::AsFd;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let Ok(null) = std::fs::metadata("/dev/null") else {
        return false;
    };
    let Ok(fd) = std::io::stdout().as_fd().try_clone_to_owned() else {
        return false;
    };
    std::fs::File::from(fd)
        .metadata()
        .is_ok_and(|out| out.file_type().is_char_device() && out.rdev() == null.rdev())
}

fn describe(info: &TokenInfo) -> String {
    let mut said = format!("role {}", info.role);
    if let Some(merchant) = &info.merchant_id {
        said.push_str(&format!(", merchant {merchant:?}"));
    }
    if let Some(name) = &info.name {
        said.push_str(&format!(", name {name:?}"));
    }
    said
}
