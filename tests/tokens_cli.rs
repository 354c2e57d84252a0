//! `settle tokens create|list|revoke` and `serve --demo`'s token, through the binary, against
//! a running `settle api` process.

mod common;

use std::process::Output;

use common::api_process;
use common::auth::client_with;

fn settle(url: &str, args: &[&str]) -> Output {
    common::settle_command()
        .args(args)
        .env("SETTLE_DATABASE__URL", url)
        .env("NO_COLOR", "1")
        .output()
        .expect("run settle")
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).expect("utf-8")
}

/// The command's error output, after asserting that it failed.
fn refused(output: Output) -> String {
    assert!(
        !output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test]
async fn a_created_token_works_until_it_is_revoked_and_is_never_listed() {
    let config = common::test_config(&[]);
    let (_pool, _db) = common::migrated_pool(&config).await;
    let url = &config.database.url;
    let created = stdout(&settle(
        url,
        &["tokens", "create", "--role", "shop", "--name", "till"],
    ));
    let token = created.lines().last().expect("a last line").to_owned();
    assert!(
        token.starts_with("settle_") && !token.contains(' '),
        "{created}"
    );
    let api = api_process::start(url, &["api"], &[("SETTLE_AUTH__CACHE_TTL_MS", "0")]).await;
    let shop = client_with(&token);
    let orders = || shop.get(format!("{}/api/v1/orders", api.base)).send();
    assert_eq!(orders().await.unwrap().status(), 200);
    let restock = shop
        .post(format!("{}/api/v1/products", api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(restock.status(), 403);

    let listed = stdout(&settle(url, &["tokens", "list"]));
    let row = listed
        .lines()
        .find(|l| l.contains("till"))
        .expect("the token listed");
    assert!(
        row.contains("shop") && row.trim_start().starts_with('1'),
        "{listed}"
    );
    assert!(
        !listed.contains(&token[7..15]),
        "a secret is never shown again: {listed}"
    );

    let revoked = stdout(&settle(url, &["tokens", "revoke", "1"]));
    assert!(revoked.contains("revoked token 1"), "{revoked}");
    assert_eq!(orders().await.unwrap().status(), 401);
    let listed = stdout(&settle(url, &["tokens", "list"]));
    assert!(
        !listed.lines().nth(1).unwrap().trim_end().ends_with('-'),
        "{listed}"
    );
}

#[tokio::test]
async fn bad_token_requests_are_refused_with_the_reason() {
    let config = common::test_config(&[]);
    let (_pool, _db) = common::migrated_pool(&config).await;
    let url = &config.database.url;
    let create = |args: &[&str]| settle(url, &[&["tokens", "create"], args].concat());
    let said = refused(create(&["--role", "merchant"]));
    assert!(said.contains("--merchant"), "{said}");
    let said = refused(create(&["--role", "shop", "--merchant", "m-1"]));
    assert!(said.contains("only for the merchant role"), "{said}");
    let said = refused(create(&["--role", "root"]));
    assert!(
        said.contains("unknown role") && said.contains("admin"),
        "{said}"
    );
    let said = refused(settle(url, &["tokens", "revoke", "42"]));
    assert!(said.contains("no token with id 42"), "{said}");
    let merchant = stdout(&create(&["--role", "merchant", "--merchant", "m-1"]));
    assert!(merchant.contains("merchant \"m-1\""), "{merchant}");
}

#[tokio::test]
async fn serve_demo_prints_an_admin_token_on_its_last_line() {
    let config = common::test_config(&[]);
    let _db = common::TestDatabase::new(&config.database.url);
    let serve = api_process::start(&config.database.url, &["serve", "--demo"], &[]).await;
    let token = serve.stdout.last().expect("a token printed");
    let admin = client_with(token);
    let jobs = admin
        .get(format!("{}/api/v1/jobs", serve.base))
        .send()
        .await
        .unwrap();
    assert_eq!(jobs.status(), 200, "{:?}", serve.stdout);
    let products = admin
        .get(format!("{}/api/v1/products/1", serve.base))
        .send();
    assert_eq!(
        products.await.unwrap().status(),
        200,
        "demo products loaded"
    );
}

/// A new token's secret that cannot be written (the reader of the output already gone, as in
/// `settle tokens create … | true`) makes no token: the command fails saying so, and nothing is
/// listed. Before, it exited 0 (a closed output counted as success, as for `jobs list | head`)
/// and left a live token whose secret nobody had.
#[tokio::test]
async fn a_secret_nobody_read_makes_no_token() {
    let config = common::test_config(&[]);
    let (_pool, _db) = common::migrated_pool(&config).await;
    let url = &config.database.url;
    let mut child = common::settle_command()
        .args(["tokens", "create", "--role", "admin", "--name", "lost"])
        .env("SETTLE_DATABASE__URL", url)
        .env("SETTLE_LOG", "off")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run settle");
    // The reader goes before the command (which connects first) writes anything.
    drop(child.stdout.take());
    let output = child.wait_with_output().expect("wait for settle");
    let said = refused(output);
    assert!(said.contains("no token was created"), "{said}");
    let listed = stdout(&settle(url, &["tokens", "list"]));
    assert!(!listed.contains("lost"), "{listed}");
}

/// A standard output that discards what it is given makes no token either: `> /dev/null`, and
/// `>&-` (Rust's runtime opens /dev/null in place of a closed standard output, so writing the
/// secret "succeeded"). Before, both exited 0 and left a live token whose secret nobody had.
#[tokio::test]
async fn a_secret_sent_to_dev_null_makes_no_token() {
    let config = common::test_config(&[]);
    let (_pool, _db) = common::migrated_pool(&config).await;
    let url = &config.database.url;
    for redirect in ["> /dev/null", ">&-"] {
        let output = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "exec \"$0\" tokens create --role admin --name lost {redirect}"
            ))
            .arg(env!("CARGO_BIN_EXE_settle"))
            .env_remove("DATABASE_URL")
            .env("SETTLE_DATABASE__URL", url)
            .env("SETTLE_LOG", "off")
            .output()
            .expect("run settle through sh");
        let said = refused(output);
        assert!(said.contains("no token was created"), "{redirect}: {said}");
    }
    let listed = stdout(&settle(url, &["tokens", "list"]));
    assert!(!listed.contains("lost"), "{listed}");
}
