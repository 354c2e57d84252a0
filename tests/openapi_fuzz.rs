//! The OpenAPI document against the running API, by a schema-driven fuzzer (Schemathesis):
//! every status an operation returns is documented, every request the document allows is
//! accepted, every request it forbids is refused, and nothing answers 500. The exceptions are
//! in `tests/fuzz/schemathesis.toml`, each with its reason.
//!
//! Needs Python 3 with Schemathesis (`pip install schemathesis`; `.ci/run` installs it), run
//! through `tests/fuzz/st.py`, which works around a CPython 3.11 bug. The seed is fixed so
//! a failure reproduces; the command to replay it is in the output.

mod common;

use std::process::Command;

/// Examples per operation and phase: enough to walk every field's edges in ~30 s.
const MAX_EXAMPLES: &str = "40";

#[tokio::test]
async fn the_fuzzer_finds_no_undocumented_status_and_no_mismatch() {
    let app = common::spawn_app().await;
    app.product(1_000, 500).await;
    let document = app.url("/api/v1/openapi.json");
    let token = app.admin_token.clone();
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fuzz/schemathesis.toml");
    let run = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fuzz/st.py"))
            .args(["--config-file", config, "--no-color", "run", &document])
            .args(["--checks", "all", "--phases", "examples,coverage,fuzzing"])
            .args([
                "--max-examples",
                MAX_EXAMPLES,
                "--seed",
                "1",
                "--workers",
                "2",
            ])
            .env("SETTLE_FUZZ_TOKEN", token)
            .output()
    })
    .await
    .expect("fuzzer thread");
    let output = run.unwrap_or_else(|e| {
        panic!("cannot run python3 ({e}): install Python 3 and `pip install schemathesis`")
    });
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(report.contains("Tested: "), "{report}");
}
