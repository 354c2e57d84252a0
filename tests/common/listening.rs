//! Reading a `settle api`/`serve` child's log until it says where it listens.

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStderr};

/// Reads `child`'s stderr (piped) until its "listening on http://…" line, within 60 s;
/// returns the base URL and every line read before it. The rest of the log stays readable
/// through the returned reader.
pub async fn base_url(child: &mut Child) -> (String, Vec<String>, Lines<BufReader<ChildStderr>>) {
    let mut lines = BufReader::new(child.stderr.take().expect("stderr piped")).lines();
    let mut before = Vec::new();
    let base = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.expect("read log") {
            if let Some(url) = settle::bench::process::listening_url(&line) {
                return url;
            }
            before.push(line);
        }
        panic!("exited without listening:\n{}", before.join("\n"));
    })
    .await
    .expect("listening within 60 s");
    (base, before, lines)
}
