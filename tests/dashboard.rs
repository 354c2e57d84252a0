//! The dashboard at `/`: served from the binary, and working in a real headless Chromium
//! against a real api and a real worker process: an operator applies a token, cancels a running
//! job by clicking (or from the keyboard), and starts a settlement with the form. Behind a
//! proxy ([`Front`]) the page meets what networks do: a sign-in page in place of the API, an API
//! that never answers, a reading that arrives late, an answer lost.

mod common;

use common::browser::Browser;
use common::front::{Front, Mode};
use common::processes::{
    WorkerProcess, enqueue, job_state, probe_tables, wait_for, wait_mid_way, wait_state,
};
use common::{TestApp, spawn_app, spawn_app_with};
use std::time::Duration;

use fantoccini::key::Key;
use serde_json::json;
use settle::jobs::kind::{COUNT, FAIL, NOOP};
use settle::tokens::Role;

#[tokio::test]
async fn the_dashboard_is_served_from_the_binary_and_loads_nothing_from_elsewhere() {
    let app = spawn_app().await;
    for (path, content_type) in [
        ("/", "text/html"),
        ("/dashboard/app.js", "text/javascript"),
        ("/dashboard/style.css", "text/css"),
    ] {
        let response = app.http.get(app.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        let headers = response.headers().clone();
        assert!(
            headers["content-type"]
                .to_str()
                .unwrap()
                .starts_with(content_type)
        );
        let csp = headers["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("script-src 'self'"), "{path}: {csp}");
        let text = response.text().await.unwrap();
        for remote in [
            "src=\"http",
            "href=\"http",
            "src=\"//",
            "href=\"//",
            "url(http",
            "import ",
        ] {
            assert!(!text.contains(remote), "{path} loads {remote}…");
        }
    }
    let html = app
        .http
        .get(app.url("/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(html.contains("<input id=\"token\""), "a token field");
    assert_eq!(html.matches("type=\"date\"").count(), 2, "two date fields");
}

/// An app with the probe kinds' tables and a worker process (returned) polling every 200 ms.
async fn app_and_worker() -> (TestApp, WorkerProcess) {
    let app = spawn_app_with(&[("worker.poll_interval_ms", json!(200))]).await;
    probe_tables(&app.pool).await;
    let worker = WorkerProcess::start(&app.config);
    (app, worker)
}

/// Two products (one sold out) and three transactions paid on 2025-01-01.
async fn seed(app: &TestApp) {
    app.product(12_345, 1_999).await;
    app.product(0, 250).await;
    for (i, amount) in [10_000, 2_500, 7_250].into_iter().enumerate() {
        let (status, body) = app
            .post(
                "/api/v1/transactions",
                &json!({"merchant_id": "m-1", "external_id": format!("ch_{i}"),
                        "amount_cents": amount, "fee_cents": 30, "status": "PAID",
                        "paid_at": "2025-01-01T12:00:00Z"}),
            )
            .await;
        assert_eq!(status, 201, "{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_cancels_a_running_job_and_starts_a_settlement_in_a_real_browser() {
    let (app, _worker) = app_and_worker().await;
    seed(&app).await;
    // Long jobs in small checkpointed batches: hundreds of batches, 300 ms apart.
    let long = json!({"upto": 600_000, "batch": 2_000, "sleep_ms": 300});
    let to_cancel = enqueue(&app.pool, COUNT, long.clone(), 1).await;
    let keeps_running = enqueue(&app.pool, COUNT, long, 1).await;
    let failed = enqueue(&app.pool, FAIL, json!({"times": 9}), 1).await;
    wait_mid_way(&app.pool, to_cancel).await;

    let browser = Browser::signed_in(&app.url("/"), &app.admin_token).await;
    browser.wait_text("#token-state", "Applied").await;
    assert_eq!(
        browser.session_storage("settle.token").await,
        app.admin_token
    );
    // The products, stock with thousands separators; the failed job offers a retry.
    browser.wait_text("#products-body", "12,345").await;
    browser.wait_text("#products-body", "Sold out").await;
    browser.wait_job_status(failed, "FAILED").await;
    let retry = format!("{} button[data-action=retry]", Browser::job_row(failed));
    browser.find(&retry).await;

    browser.wait_job_status(to_cancel, "RUNNING").await;
    let cancel = format!("{} button[data-action=cancel]", Browser::job_row(to_cancel));
    browser.click(&cancel).await;
    browser.wait_job_status(to_cancel, "CANCELLED").await;
    assert_eq!(job_state(&app.pool, to_cancel).await, "cancelled");

    let before = browser.job_ids().await;
    browser.fill_date("#settle-from", "2025-01-01").await;
    browser.fill_date("#settle-to", "2025-01-01").await;
    browser.click("#settle-submit").await;
    let started =
        common::processes::wait_for(common::browser::PATIENCE, "a new job row", || async {
            let ids = browser.job_ids().await;
            ids.into_iter().find(|id| !before.contains(id))
        })
        .await;
    browser.wait_job_status(started, "COMPLETED").await;
    assert_eq!(job_state(&app.pool, started).await, "completed");
    let args: serde_json::Value = sqlx::query_scalar("select args from all_jobs where id = $1")
        .bind(started)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(args, json!({"from": "2025-01-01", "to": "2025-01-01"}));
    let row = Browser::job_row(started);
    browser
        .wait_text(&format!("{row} .actions"), "Download CSV")
        .await;
    browser.wait_text(&format!("{row} .processed"), "3").await;
    assert_eq!(job_state(&app.pool, keeps_running).await, "running");
    browser.wait_job_status(keeps_running, "RUNNING").await;

    let shot = browser.screenshot("dashboard.png").await;
    assert!(std::fs::metadata(&shot).unwrap().len() > 0);
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_settlement_says_why_on_the_page_and_starts_nothing() {
    let app = spawn_app().await;
    let browser = Browser::start().await;
    browser.open(&app.url("/")).await;
    browser.wait_text("#token-state", "No token").await;
    let token = format!("{}{}", app.admin_token, Key::Enter);
    browser.type_into("#token", &token).await;
    browser.wait_text("#token-state", "Applied").await;
    browser.fill_date("#settle-from", "2025-01-31").await;
    browser.fill_date("#settle-to", "2025-01-01").await;
    browser.click("#settle-submit").await;
    let notice = browser.wait_text("#notice", "INVALID_DATE_RANGE").await;
    assert!(notice.contains("422"), "{notice}");
    let jobs = common::scalar(&app.pool, "select count(*) from all_jobs").await;
    assert_eq!(jobs, 0);
    assert!(browser.job_ids().await.is_empty());
    browser.close().await;
}

/// A job still running keeps its row, and its Cancel button, however many newer jobs have
/// finished since: the page lists every live job, not only the newest page of jobs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_job_older_than_the_newest_page_keeps_its_row() {
    let (app, _worker) = app_and_worker().await;
    let long = json!({"upto": 600_000, "batch": 2_000, "sleep_ms": 300});
    let old = enqueue(&app.pool, COUNT, long, 1).await;
    wait_mid_way(&app.pool, old).await;
    // More than a page (pagination.default_page_size, 50) of newer jobs, all finished.
    let mut newer = Vec::new();
    for _ in 0..60 {
        newer.push(enqueue(&app.pool, NOOP, json!({}), 1).await);
    }
    for id in newer {
        wait_state(&app.pool, id, "completed").await;
    }

    let browser = Browser::signed_in(&app.url("/"), &app.admin_token).await;
    browser.wait_job_status(old, "RUNNING").await;
    let cancel = format!("{} button[data-action=cancel]", Browser::job_row(old));
    browser.find(&cancel).await;
    browser.close().await;
}

/// A Cancel that fails (here the API stopped answering) says why and gives the button back,
/// enabled, instead of showing "Cancelling…" on a job nothing is cancelling. The polls, failing
/// too, keep the row, marked stale rather than live, and leave the action's own notice in place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_cancel_says_why_and_gives_its_button_back() {
    let app = spawn_app().await;
    let id = enqueue(&app.pool, NOOP, json!({}), 1).await; // no worker: it stays QUEUED
    let browser = Browser::signed_in(&app.url("/"), &app.admin_token).await;
    browser.wait_job_status(id, "QUEUED").await;
    browser.wait_text("#jobs-updated", "Live").await;
    app.stop();
    let cancel = format!("{} button[data-action=cancel]", Browser::job_row(id));
    browser.click(&cancel).await;
    let said = format!("Cancel job #{id}: the settle API did not answer");
    browser.wait_text("#notice", &said).await;
    browser.wait_text("#jobs-updated", "Stale since").await;
    // The polls, failing too meanwhile, leave the action's own notice in place.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let notice = browser.text("#notice").await.unwrap_or_default();
    assert!(notice.contains(&said), "{notice}");
    browser.wait_button(&cancel, "Cancel").await;
    assert_eq!(job_state(&app.pool, id).await, "queued");
    browser.close().await;
}

/// A token the API stops taking leaves nothing it read on the page: once a reading is refused
/// (401, the token revoked), the job rows, their buttons and the products are gone, with the
/// notice, and nothing claims to be live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_leaves_no_rows_or_buttons_behind() {
    let app = spawn_app_with(&[("auth.cache_ttl_ms", json!(0))]).await;
    app.product(7, 100).await;
    let id = enqueue(&app.pool, NOOP, json!({}), 1).await; // no worker: QUEUED, cancellable
    let token = common::auth::create_token(&app.pool, Role::Admin, None).await;
    let browser = Browser::signed_in(&app.url("/"), &token).await;
    let cancel = format!("{} button[data-action=cancel]", Browser::job_row(id));
    browser.find(&cancel).await;
    browser.wait_text("#products-body", "test product").await;
    app.revoke_newest(Role::Admin).await;
    browser.wait_text("#notice", "401 UNAUTHENTICATED").await;
    assert_eq!(browser.job_ids().await, Vec::<i64>::new());
    assert_eq!(
        browser
            .count("#jobs-body button, #jobs-body a, #products-body tr")
            .await,
        0
    );
    for label in ["#jobs-updated", "#products-count"] {
        let text = browser.text(label).await.unwrap_or_default();
        assert!(text.contains("Not shown · 401"), "{label}: {text}");
    }
    browser.close().await;
}

/// Another token applied shows only what it may read: a `shop` token reads the products, not
/// the jobs, so the admin's job rows and their buttons go while the products stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_token_applied_shows_only_what_it_may_read() {
    let app = spawn_app().await;
    app.product(7, 100).await;
    let id = enqueue(&app.pool, NOOP, json!({}), 1).await; // no worker: QUEUED, cancellable
    let browser = Browser::signed_in(&app.url("/"), &app.admin_token).await;
    browser.wait_job_status(id, "QUEUED").await;
    let shop = app.token(Role::Shop, None).await;
    browser
        .find("#token")
        .await
        .clear()
        .await
        .expect("empty the token field");
    browser
        .type_into("#token", &format!("{shop}{}", Key::Enter))
        .await;
    browser.wait_text("#notice", "403 FORBIDDEN").await;
    assert_eq!(browser.job_ids().await, Vec::<i64>::new());
    assert_eq!(browser.count("#jobs-body button, #jobs-body a").await, 0);
    assert!(
        !browser
            .text("#jobs-updated")
            .await
            .unwrap_or_default()
            .contains("Live")
    );
    browser.wait_text("#products-body", "test product").await;
    browser.close().await;
}

/// A Retry whose job fails again before the page next reads the jobs (FAILED, then FAILED
/// again) gives the row its Retry button back, not a "Retrying…" one left disabled. The worker
/// fails the job within milliseconds, so some of the rounds read FAILED right after the click.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_job_that_fails_again_offers_its_retry_again() {
    let (app, _worker) = app_and_worker().await;
    let failing = enqueue(&app.pool, FAIL, json!({"times": 100}), 1).await;
    wait_state(&app.pool, failing, "failed").await;
    let browser = Browser::signed_in(&app.url("/"), &app.admin_token).await;
    let retry = format!("{} button[data-action=retry]", Browser::job_row(failing));
    for failures in 2..=6 {
        browser.click(&retry).await;
        let what = format!("failure {failures} of job {failing}");
        wait_for(common::browser::PATIENCE, &what, || async {
            let sql = "select jsonb_array_length(errors)::int8 from all_jobs where id = $1";
            (common::scalar_of(&app.pool, sql, failing).await >= failures).then_some(())
        })
        .await;
        browser.wait_button(&retry, "Retry").await;
    }
    browser.close().await;
}

/// Where each card's content sits, measured in the page: whether the page or a card spills
/// sideways, the right edge of the Products table's Stock heading (once everything between the
/// table and its card is scrolled to the end) against the inner edge of the card's padding, and
/// each card heading's label against its heading (their text, not their boxes).
const LAYOUT: &str = r##"
const view = document.documentElement.clientWidth;
const text = (el) => { const r = document.createRange(); r.selectNodeContents(el);
  return r.getBoundingClientRect(); };
const cards = [...document.querySelectorAll(".card")].map((card) => ({
  card: card.getAttribute("aria-labelledby"),
  spill: card.scrollWidth - card.clientWidth,
  right: card.getBoundingClientRect().right,
}));
const stock = document.querySelector("#products-body").closest("table").querySelector("th:last-child");
const products = stock.closest(".card");
for (let el = stock.closest("table").parentElement; el !== products.parentElement; el = el.parentElement) {
  el.scrollLeft = el.scrollWidth;
}
const labels = [...document.querySelectorAll(".card-head")].flatMap((head) => {
  const label = head.querySelector(".hint");
  if (!label || !label.textContent) return [];
  const [h, l] = [text(head.querySelector("h2")), text(label)];
  return [{ label: label.id, text: label.textContent, below: l.top - h.bottom,
            after: l.left - h.right }];
});
const inside = products.getBoundingClientRect().right - products.clientLeft
  - parseFloat(getComputedStyle(products).paddingRight);
return { view, page_spill: document.documentElement.scrollWidth - view, cards,
         stock_right: stock.getBoundingClientRect().right, products_inside_right: inside, labels };
"##;

/// The page's [`LAYOUT`] at `width` px wide, with a screenshot `<shot>-<width>.png` to look at.
async fn layout_at(browser: &Browser, width: u32, shot: &str) -> serde_json::Value {
    browser.client.set_window_size(width, 960).await.unwrap();
    let layout = browser.client.execute(LAYOUT, vec![]).await.unwrap();
    browser.screenshot(&format!("{shot}-{width}.png")).await;
    layout
}

/// The two-column layout, the one-column one, and a phone's width.
const WIDTHS: [u32; 3] = [1400, 900, 375];

/// Long figures and labels stay inside their cards, in the two-column layout (1400 px), the
/// one-column one (900 px) and on a phone (375 px: the header wraps, the days stack): a product
/// at the largest price (10^12 cents) with over a billion in stock scrolls within the Products
/// card, its Stock column in reach, instead of spilling off the page; and without a token each
/// "Not shown · 401 UNAUTHENTICATED" label keeps clear of its card's heading.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_figures_and_labels_stay_inside_their_cards() {
    let app = spawn_app().await;
    let id = app
        .product(settle::orders::MAX_STOCK, settle::orders::MAX_PRICE_CENTS)
        .await;
    let restock = format!("/api/v1/products/{id}/restock");
    let (status, body) = app.post(&restock, &json!({"quantity": 1})).await;
    assert_eq!(status, 200, "{body}");

    let browser = Browser::start().await;
    browser.open(&app.url("/")).await;
    for label in ["#products-count", "#jobs-updated"] {
        browser
            .wait_text(label, "Not shown · 401 UNAUTHENTICATED")
            .await;
    }
    for width in WIDTHS {
        let layout = layout_at(&browser, width, "dashboard-no-token").await;
        let labels = layout["labels"].as_array().unwrap();
        assert_eq!(labels.len(), 2, "{layout:#}");
        for label in labels {
            let below = label["below"].as_f64().unwrap() >= 0.0;
            let after = label["after"].as_f64().unwrap() >= 8.0;
            assert!(
                below || after,
                "{width} px: a label runs into its heading: {label}"
            );
        }
    }

    let keys = format!("{}{}", app.admin_token, Key::Enter);
    browser.type_into("#token", &keys).await;
    browser
        .wait_text("#products-body", "10,000,000,000.00")
        .await;
    browser.wait_text("#products-body", "1,000,000,001").await;
    for width in WIDTHS {
        let layout = layout_at(&browser, width, "dashboard-long-figures").await;
        let view = layout["view"].as_f64().unwrap();
        assert_eq!(
            layout["page_spill"], 0,
            "{width} px: the page scrolls sideways: {layout:#}"
        );
        for card in layout["cards"].as_array().unwrap() {
            assert_eq!(
                card["spill"], 0,
                "{width} px: a card's content spills out: {layout:#}"
            );
            assert!(card["right"].as_f64().unwrap() <= view, "{layout:#}");
        }
        let stock_right = layout["stock_right"].as_f64().unwrap();
        let inside = layout["products_inside_right"].as_f64().unwrap();
        assert!(
            stock_right <= inside.min(view) + 1.0, // a scroll offset rounds to a pixel
            "{width} px: the Stock column is out of reach: {layout:#}"
        );
    }
    browser.close().await;
}

/// Keyboard-only use: Tab from the token field reaches the newest row's Cancel button, the focus
/// stays there while the polls re-read and redraw the rows, and Enter cancels that job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rows_button_keeps_the_keyboard_focus_across_polls() {
    let app = spawn_app().await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(enqueue(&app.pool, NOOP, json!({}), 1).await); // no worker: QUEUED
    }
    let browser = Browser::signed_in(&app.url("/"), &app.admin_token).await;
    for &id in &ids {
        browser.wait_job_status(id, "QUEUED").await;
    }
    browser.press(Key::Tab).await;
    let newest = ids[2];
    let cancel = format!("cancel {newest}");
    assert_eq!(browser.focused().await, cancel, "Tab from the token field");
    tokio::time::sleep(Duration::from_millis(2_500)).await; // two polls and more
    assert_eq!(browser.focused().await, cancel, "after the polls");
    browser.press(Key::Enter).await;
    wait_state(&app.pool, newest, "cancelled").await;
    for &id in &ids[..2] {
        assert_eq!(job_state(&app.pool, id).await, "queued");
    }
    browser.close().await;
}

/// An app with a job QUEUED (no worker), and the page reading it live through a [`Front`] with
/// the app's admin token.
async fn queued_behind_a_front() -> (TestApp, i64, Front, Browser) {
    let app = spawn_app().await;
    let id = enqueue(&app.pool, NOOP, json!({}), 1).await;
    let front = Front::start(&app.base).await;
    let browser = Browser::signed_in(&front.url("/"), &app.admin_token).await;
    browser.wait_job_status(id, "QUEUED").await;
    browser.wait_text("#jobs-updated", "Live").await;
    (app, id, front, browser)
}

/// A proxy in front of the API whose sign-in session expired answers the page's readings with a
/// redirect to a sign-in page, 200 in HTML: the jobs are marked stale (the row kept, with its
/// button), the notice says the answer was not the API's, and the polls go on, so the page is
/// live again once the API answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sign_in_page_in_place_of_the_api_marks_the_jobs_stale_and_the_polls_go_on() {
    let (_app, id, front, browser) = queued_behind_a_front().await;
    front.set(Mode::SignIn);
    browser.wait_text("#jobs-updated", "Stale since").await;
    let notice = browser.wait_text("#notice", "not JSON").await;
    assert!(notice.contains("Loading"), "{notice}");
    browser
        .find(&format!(
            "{} button[data-action=cancel]",
            Browser::job_row(id)
        ))
        .await;
    front.set(Mode::Pass);
    browser.wait_text("#jobs-updated", "Live").await;
    wait_for(common::browser::PATIENCE, "the notice to clear", || async {
        browser.text("#notice").await.filter(String::is_empty)
    })
    .await;
    browser.close().await;
}

/// An API that takes a request and never answers is shown as such: each reading gives up after a
/// few seconds, the jobs are marked stale with a notice that the API did not answer, and the
/// page is live again once it answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_that_never_answers_is_shown_stale() {
    let (_app, _, front, browser) = queued_behind_a_front().await;
    front.set(Mode::Silent);
    browser.wait_text("#jobs-updated", "Stale since").await;
    browser
        .wait_text("#notice", "the settle API did not answer")
        .await;
    front.set(Mode::Pass);
    browser.wait_text("#jobs-updated", "Live").await;
    browser.close().await;
}

/// A reading of the jobs that began before a Cancel and arrives after the Cancel's own reading
/// is not shown: the row stays CANCELLED, not QUEUED again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_reading_does_not_undo_a_cancel_on_the_page() {
    let (app, id, front, browser) = queued_behind_a_front().await;
    // Each reading asks for the newest page, answered here in the order the test says.
    front.hold("/api/v1/jobs");
    front.wait_held(1).await; // a poll's, of the job QUEUED
    browser
        .click(&format!(
            "{} button[data-action=cancel]",
            Browser::job_row(id)
        ))
        .await;
    front.wait_held(2).await; // the Cancel's
    assert_eq!(job_state(&app.pool, id).await, "cancelled");
    front.release(1);
    browser.wait_job_status(id, "CANCELLED").await;
    front.release(0);
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let pill = format!("{} .pill", Browser::job_row(id));
    assert_eq!(browser.text(&pill).await.as_deref(), Some("CANCELLED"));
    browser.close().await;
}

/// A token that is not of the shape this service issues is not applied: the notice says what
/// is wrong with it (not that the API did not answer, as a header the browser cannot send made
/// it say), and the token applied before stays, with what it read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_of_the_wrong_shape_is_refused_saying_what_is_wrong() {
    let app = spawn_app().await;
    let id = enqueue(&app.pool, NOOP, json!({}), 1).await; // no worker: QUEUED
    let browser = Browser::signed_in(&app.url("/"), &app.admin_token).await;
    browser.wait_job_status(id, "QUEUED").await;
    let token = &app.admin_token;
    for (typed, said) in [
        (format!("{token}\u{200b}"), "U+200B"),
        (token[..40].to_owned(), "33 hex digits"),
        (format!("Bearer {token}"), "Bearer"),
    ] {
        let field = browser.find("#token").await;
        field.clear().await.expect("empty the token field");
        browser
            .type_into("#token", &format!("{typed}{}", Key::Enter))
            .await;
        let notice = browser.wait_text("#notice", said).await;
        assert!(!notice.contains("did not answer"), "{notice}");
        assert_eq!(browser.session_storage("settle.token").await, *token);
        assert_eq!(browser.job_ids().await, vec![id]);
    }
    browser.close().await;
}

/// A settlement whose answer was lost (the API started it, the page heard nothing) is not
/// started twice when the operator presses Start again with the same days: the form sends the
/// same Idempotency-Key, and the API answers with the job it made. Nor by Chromium, which sends
/// a POST whose reused connection closed unanswered again by itself (five jobs without a key).
/// Once answered, Start starts another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settlement_started_again_after_no_answer_is_not_started_twice() {
    let (app, _, front, browser) = queued_behind_a_front().await;
    browser.fill_date("#settle-from", "2025-01-01").await;
    browser.fill_date("#settle-to", "2025-01-01").await;
    let settlements = "select count(*) from all_jobs where kind = 'settlement'";
    front.set(Mode::Cut);
    browser.click("#settle-submit").await;
    browser
        .wait_text(
            "#notice",
            "Starting the settlement: the settle API did not answer",
        )
        .await;
    assert_eq!(common::scalar(&app.pool, settlements).await, 1);
    let started: i64 = sqlx::query_scalar("select id from all_jobs where kind = 'settlement'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    front.set(Mode::Pass);
    browser
        .wait_button("#settle-submit", "Start settlement")
        .await;
    browser.click("#settle-submit").await;
    let result = browser.wait_text("#settle-result", "queued").await;
    assert_eq!(result, format!("Settlement #{started} queued."));
    assert_eq!(common::scalar(&app.pool, settlements).await, 1);
    browser
        .wait_button("#settle-submit", "Start settlement")
        .await;
    browser.click("#settle-submit").await;
    wait_for(common::browser::PATIENCE, "a second settlement", || async {
        (common::scalar(&app.pool, settlements).await == 2).then_some(())
    })
    .await;
    browser.close().await;
}

/// More queued jobs than a page lists: the summary says at least that many ("50+ queued"), not
/// a count an operator would read as the whole queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_count_that_stops_at_a_full_page_says_at_least() {
    // No worker: the jobs stay queued.
    let app = spawn_app().await;
    for _ in 0..60 {
        enqueue(&app.pool, NOOP, json!({}), 1).await;
    }
    let browser = Browser::signed_in(&app.url("/"), &app.admin_token).await;
    let summary = browser.wait_text("#jobs-summary", "queued").await;
    assert_eq!(summary, "50+ queued");
    browser.close().await;
    // Under a page, the count is exact.
    sqlx::query("delete from jobs where id not in (select id from jobs order by id limit 10)")
        .execute(&app.pool)
        .await
        .unwrap();
    let browser = Browser::signed_in(&app.url("/"), &app.admin_token).await;
    assert_eq!(
        browser.wait_text("#jobs-summary", "queued").await,
        "10 queued"
    );
    browser.close().await;
}

/// A settlement's CSV that does not come is not saved and the page says why: a proxy whose
/// sign-in session expired answers its sign-in page (which the page saved as the CSV before),
/// and an API that never answers is given up on after a few seconds (the page waited for ever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_that_is_not_the_csv_says_why() {
    let (app, _worker) = app_and_worker().await;
    seed(&app).await;
    let range = json!({"from": "2025-01-01", "to": "2025-01-01"});
    let (status, body) = app.post("/api/v1/jobs/settlement", &range).await;
    assert_eq!(status, 202, "{body}");
    let id = body["job_id"].as_i64().unwrap();
    wait_state(&app.pool, id, "completed").await;
    let front = Front::start(&app.base).await;
    let browser = Browser::signed_in(&front.url("/"), &app.admin_token).await;
    let link = format!("{} a.download", Browser::job_row(id));
    browser.find(&link).await;

    front.set(Mode::SignIn);
    browser.click(&link).await;
    let notice = browser.wait_text("#notice", "not CSV (text/html").await;
    assert!(
        notice.contains(&format!("Download of job #{id}")),
        "{notice}"
    );
    front.set(Mode::Silent);
    browser.click(&link).await;
    browser
        .wait_text("#notice", "did not answer within 5 s")
        .await;
    browser.close().await;
}

/// Products past the newest page are reached page by page: Older reads the next page, Newer
/// goes back, and the label says which page shows. Before, the newest page was all there was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn older_products_are_reached_page_by_page() {
    let app = spawn_app_with(&[("pagination.default_page_size", json!(2))]).await;
    let mut ids = Vec::new();
    for stock in 1..=5 {
        ids.push(app.product(stock, 100).await);
    }
    let browser = Browser::signed_in(&app.url("/"), &app.admin_token).await;
    // Newest first, two to a page.
    let newest = (&ids[3..], "newest 2");
    let second = (&ids[1..3], "page 2");
    let oldest = (&ids[..1], "page 3 · the oldest");
    for (page, older) in [(newest, true), (second, true), (oldest, false)] {
        products_shown(&browser, page).await;
        let buttons = browser.count("#products-older:not([hidden])").await;
        assert_eq!(buttons, usize::from(older), "Older on {:?}", page.1);
        if older {
            browser.click("#products-older").await;
        }
    }
    for page in [second, newest] {
        browser.click("#products-newer").await;
        products_shown(&browser, page).await;
    }
    assert_eq!(browser.count("#products-newer:not([hidden])").await, 0);
    browser.close().await;
}

/// Waits until the products card shows exactly the products `ids`, under `label`.
async fn products_shown(browser: &Browser, (ids, label): (&[i64], &str)) {
    browser.wait_text("#products-count", label).await;
    let what = format!("products {ids:?}");
    wait_for(Duration::from_secs(10), &what, || async {
        let mut shown = Vec::new();
        for id in ids {
            let row = format!("#products-body tr[data-product-id='{id}']");
            shown.push(browser.count(&row).await);
        }
        let all = browser.count("#products-body tr").await;
        (all == ids.len() && shown.iter().all(|&n| n == 1)).then_some(())
    })
    .await;
}
