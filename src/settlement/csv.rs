//! The settlement CSV on disk: streamed from Postgres' `COPY … TO STDOUT` into a temp file in
//! the results directory, fsynced, then renamed to `{job_id}.csv`, so a reader only ever sees a
//! whole file and memory stays at one COPY chunk however many rows there are.

use std::path::{Path, PathBuf};

use futures::TryStreamExt;
use sqlx::PgConnection;
use tokio::io::{AsyncWriteExt, BufWriter};

use super::SettleError;

/// Bytes gathered before each write to the file: memory stays at this however big the CSV.
const WRITE_BUFFER: usize = 256 * 1024;

/// Where the finished CSV of `job_id` lives.
pub fn final_path(results_dir: &Path, job_id: i64) -> PathBuf {
    results_dir.join(format!("{job_id}.csv"))
}

/// A CSV written and synced under a temp name, not yet visible under its final name.
#[derive(Debug)]
pub struct StagedCsv {
    temp: PathBuf,
    target: PathBuf,
}

impl StagedCsv {
    /// Runs `copy_statement` on `conn` and writes its output to a fresh temp file.
    pub async fn write(
        conn: &mut PgConnection,
        copy_statement: &str,
        results_dir: &Path,
        job_id: i64,
    ) -> Result<Self, SettleError> {
        tokio::fs::create_dir_all(results_dir).await?;
        // Dot-prefixed and unique per attempt: never served, never shared by two writers.
        let temp = results_dir.join(format!(".{job_id}.{}.csv.tmp", uuid::Uuid::new_v4()));
        let staged = Self {
            temp,
            target: final_path(results_dir, job_id),
        };
        if let Err(e) = staged.fill(conn, copy_statement).await {
            staged.abandon().await;
            return Err(e);
        }
        Ok(staged)
    }

    async fn fill(&self, conn: &mut PgConnection, copy_statement: &str) -> Result<(), SettleError> {
        let file = tokio::fs::File::create(&self.temp).await?;
        // COPY arrives one row per chunk; unbuffered, each would be its own trip to the
        // blocking pool (measured: 720 ms for 30,000 rows, against 45 ms for psql's \copy).
        let mut out = BufWriter::with_capacity(WRITE_BUFFER, file);
        let mut stream = conn.copy_out_raw(copy_statement).await?;
        while let Some(chunk) = stream.try_next().await? {
            out.write_all(&chunk).await?;
        }
        out.flush().await?;
        out.get_ref().sync_all().await?;
        Ok(())
    }

    /// Renames the file into place and syncs the directory, so the name survives a crash.
    pub async fn publish(self) -> Result<PathBuf, SettleError> {
        tokio::fs::rename(&self.temp, &self.target).await?;
        if let Some(dir) = self.target.parent() {
            tokio::fs::File::open(dir).await?.sync_all().await?;
        }
        Ok(self.target)
    }

    /// Removes the temp file (best effort: a leftover dot-file is never served).
    pub async fn abandon(&self) {
        let _ = tokio::fs::remove_file(&self.temp).await;
    }
}

/// Removes a job's published CSV if there is one (a job that failed or was cancelled after a
/// publish whose commit did not land).
pub async fn remove(results_dir: &Path, job_id: i64) -> std::io::Result<()> {
    match tokio::fs::remove_file(final_path(results_dir, job_id)).await {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}
