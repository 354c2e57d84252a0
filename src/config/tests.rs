use super::*;
use figment::providers::Serialized;
use std::time::Duration;

/// The error with its causes, as the CLI prints it.
fn chain(e: ConfigError) -> String {
    format!("{:#}", anyhow::Error::from(e))
}

/// What loading the defaults with `key` set to `value` fails with.
fn refused(key: &str, value: impl serde::Serialize) -> String {
    let figment = Config::defaults().merge(Serialized::default(key, value));
    chain(Config::from_figment(figment).unwrap_err())
}

#[test]
fn defaults_are_valid() {
    Config::from_figment(Config::defaults()).expect("shipped config.toml is valid");
}

#[test]
fn unknown_key_is_named() {
    let figment = Config::defaults().merge(Toml::string("[http]\nprot = 1\n"));
    let err = chain(Config::from_figment(figment).unwrap_err());
    assert!(err.contains("prot"), "{err}");
    // Page sizes moved to [pagination]; the old keys are refused, not ignored.
    let figment = Config::defaults().merge(Toml::string("[orders]\nmax_page_size = 9\n"));
    let err = chain(Config::from_figment(figment).unwrap_err());
    assert!(err.contains("max_page_size"), "{err}");
}

/// `settlement.revised_days_max` no longer has an effect (migration 0021) but a config.toml of
/// the release that had it still loads, the key kept for `settle` to warn about.
#[test]
fn the_retired_revised_days_max_still_loads() {
    let figment = Config::defaults().merge(Toml::string("[settlement]\nrevised_days_max = 7\n"));
    let config = Config::from_figment(figment).unwrap_or_else(|e| panic!("{}", chain(e)));
    assert_eq!(config.settlement.revised_days_max, Some(7));
    let defaults = Config::from_figment(Config::defaults()).unwrap();
    assert_eq!(defaults.settlement.revised_days_max, None);
}

#[test]
fn bad_value_is_named() {
    let err = refused("worker.concurrency", 0);
    assert!(err.contains("worker.concurrency"), "{err}");
    let err = refused("http.port", "eighty");
    assert!(err.contains("port"), "{err}");
    for (key, value) in [
        ("worker.shutdown_grace_ms", 5001),
        ("worker.retention_interval_ms", 0),
        ("worker.vacuum_dead_rows", -1),
        ("worker.vacuum_interval_ms", 0),
        ("idempotency.prune_interval_ms", 0),
        ("pagination.default_page_size", 501),
        ("auth.cache_ttl_ms", 60_001),
        ("schedule.check_interval_ms", 0),
        ("worker.backoff_base_ms", 0),
        ("worker.rescue_probe_ms", 0),
        ("worker.concurrency", 10_001),
        ("http.listen_backlog", 0),
        ("http.listen_backlog", 65_536),
        ("settlement.revision_retention_hours", 0),
    ] {
        let err = refused(key, value);
        assert!(err.contains(&format!("`{key}`")), "{key}: {err}");
    }
    for (key, value) in [
        // Twice these wrapped around in a release build and passed.
        ("worker.heartbeat_ms", 1u64 << 63),
        ("worker.shutdown_grace_ms", 1 << 63),
        ("worker.lease_ms", 1 << 31),
        ("http.request_timeout_ms", u64::MAX),
    ] {
        let err = refused(key, value);
        assert!(err.contains(&format!("`{key}`")), "{key}: {err}");
    }
    let err = refused(
        "worker.timeouts",
        serde_json::json!({"settlement": 1u64 << 31}),
    );
    assert!(err.contains("`worker.timeouts.settlement`"), "{err}");
}

#[test]
fn schedule_times_and_zones_are_checked() {
    for (key, value) in [
        ("schedule.at", "25:00"),
        ("schedule.at", "noon"),
        // A leap second: chrono takes it for a time after 23:59:59, a day late.
        ("schedule.at", "23:59:60"),
        ("schedule.time_zone", "Mars/Olympus"),
    ] {
        let err = refused(key, value);
        assert!(err.contains(key), "{key}={value}: {err}");
    }
    for days in [0, 367] {
        let err = refused("schedule.catch_up_days", days);
        assert!(err.contains("`schedule.catch_up_days`"), "{days}: {err}");
    }
    let figment = Config::defaults().merge(Serialized::default("schedule.at", "23:59:30"));
    let config = Config::from_figment(figment).unwrap();
    assert_eq!(config.schedule.at_time(), "23:59:30".parse().ok());
}

#[test]
fn attempt_timeouts_per_kind_override_the_default() {
    let defaults = Config::from_figment(Config::defaults()).unwrap();
    assert!(defaults.worker.timeouts["settlement"] > defaults.worker.job_timeout_ms);
    let figment = Config::defaults().merge(Serialized::default("worker.timeouts.sleep", 300));
    let config = Config::from_figment(figment).unwrap();
    let settings = crate::worker::settings(&config.worker);
    assert_eq!(
        settings.timeout_for(crate::jobs::kind::SLEEP),
        Duration::from_millis(300)
    );
    assert_eq!(
        settings.timeout_for(crate::jobs::kind::NOOP),
        Duration::from_millis(config.worker.job_timeout_ms)
    );
    let figment = Config::defaults().merge(Serialized::default("worker.timeouts.sleep", 0));
    let err = chain(Config::from_figment(figment).unwrap_err());
    assert!(err.contains("worker.timeouts"), "{err}");
}

#[test]
fn kind_caps_are_read_and_checked() {
    let defaults = Config::from_figment(Config::defaults()).unwrap();
    let settings = crate::worker::settings(&defaults.worker);
    let settlement = crate::settlement::job::KIND.to_owned();
    assert_eq!(
        settings.kind_concurrency,
        std::collections::HashMap::from([(settlement, 2)]),
        "settlement alone is capped by default"
    );
    let figment = Config::defaults().merge(Toml::string("[worker.kinds.sleep]\nconcurrency = 3\n"));
    let settings = crate::worker::settings(&Config::from_figment(figment).unwrap().worker);
    assert_eq!(settings.kind_concurrency[crate::jobs::kind::SLEEP], 3);
    assert!(
        !settings
            .kind_concurrency
            .contains_key(crate::jobs::kind::NOOP)
    );
    // Bounded above like `worker.concurrency` (a semaphore of ~2^61 permits panics).
    for bad in ["0", "-1", "10001", &i64::MAX.to_string()] {
        let toml = format!("[worker.kinds.sleep]\nconcurrency = {bad}\n");
        let figment = Config::defaults().merge(Toml::string(&toml));
        let err = chain(Config::from_figment(figment).unwrap_err());
        assert!(
            err.contains("`worker.kinds.sleep.concurrency` must be between 1 and 10000"),
            "{bad}: {err}"
        );
    }
    let figment = Config::defaults().merge(Toml::string("[worker.kinds.sleep]\nconcurency = 3\n"));
    let err = chain(Config::from_figment(figment).unwrap_err());
    assert!(err.contains("concurency"), "{err}");
}

#[test]
fn a_url_without_a_database_is_refused() {
    for (key, url) in [
        ("database.url", "postgres://postgres@127.0.0.1:5432"),
        ("database.url", "postgres://postgres@127.0.0.1:5432/"),
        ("database.read_url", "postgresql://postgres@replica:5432"),
    ] {
        let figment = Config::defaults().merge(Serialized::default(key, url));
        let err = chain(Config::from_figment(figment).unwrap_err());
        assert!(
            err.contains(key) && err.contains("names no database"),
            "{url}: {err}"
        );
    }
    for url in [
        "postgres://postgres@replica:5432/settle",
        // Another role's own database is its name: a choice, not the maintenance database.
        "postgres://settle:pw@replica:5432",
    ] {
        let named = Config::defaults().merge(Serialized::default("database.read_url", url));
        Config::from_figment(named).expect("a URL naming its database");
    }
}

/// Sizes and ages that the code adds to or multiplies (a page's `limit + 1`, hours in ms, a
/// batch's first id + its size) are bounded here, so a typo's huge value stops the process at
/// start with its key named, not later with an overflow panic or a statement out of range.
#[test]
fn sizes_and_ages_have_an_upper_bound() {
    let accepted = |key: &str, value: i64| {
        let figment = Config::defaults().merge(Serialized::default(key, value));
        Config::from_figment(figment).unwrap_or_else(|e| panic!("{key}={value}: {}", chain(e)))
    };
    for (key, largest) in [
        ("worker.retention_hours", 876_000),
        ("settlement.revision_retention_hours", 876_000),
        ("pagination.max_page_size", 10_000),
        ("worker.batch_size", 1_000_000_000),
    ] {
        accepted(key, largest);
        for value in [largest + 1, i64::MAX] {
            let err = refused(key, value);
            assert!(err.contains(&format!("`{key}`")), "{key}={value}: {err}");
        }
    }
    let err = refused("worker.retention_hours", u64::MAX);
    assert!(err.contains("`worker.retention_hours`"), "{err}");
    // Below the Idempotency-Key's life a retried key could name a deleted job.
    let err = refused("worker.retention_hours", 23);
    assert!(err.contains("idempotency.ttl_hours (24)"), "{err}");
    let figment = Config::defaults()
        .merge(Serialized::default("worker.retention_hours", 1))
        .merge(Serialized::default("idempotency.ttl_hours", 1));
    assert!(Config::from_figment(figment).is_ok());
    // The largest accepted retention converts to a Duration without overflow.
    let config = accepted("worker.retention_hours", 876_000);
    let settings = crate::worker::settings(&config.worker);
    assert_eq!(
        settings.retention,
        Some(Duration::from_secs(876_000 * 3600))
    );
}

/// `serve`'s private cluster stands in for the built-in URL alone: a URL named by any layer
/// turns the default off, and setting `database.local_cluster` beside it turns it back on.
#[test]
fn a_named_url_turns_the_private_cluster_off_unless_asked_for() {
    let local = |figment: Figment| {
        Config::from_figment(figment)
            .unwrap()
            .database
            .local_cluster
    };
    let url = "postgres://postgres@127.0.0.1:5432/settle";
    assert!(local(Config::defaults()));
    // Even the built-in URL, spelt out by the user, is theirs.
    assert!(!local(
        Config::defaults().merge(Serialized::default("database.url", url))
    ));
    assert!(!local(
        Config::defaults().merge(Toml::string(&format!("[database]\nurl = \"{url}\"\n")))
    ));
    assert!(local(Config::defaults().merge(Toml::string(&format!(
        "[database]\nurl = \"{url}\"\nlocal_cluster = true\n"
    )))));
    assert!(!local(
        Config::defaults().merge(Serialized::default("database.local_cluster", false))
    ));
    // A copy of the default config.toml with its url changed names that url, and asks for no
    // cluster there.
    let copy = crate::config::DEFAULT_TOML.replace(
        "url = \"postgres://postgres@127.0.0.1:5432/settle\"",
        "url = \"postgres://postgres@127.0.0.1:5999/copied\"",
    );
    assert!(copy.contains("5999/copied"));
    assert!(!local(Config::defaults().merge(Toml::string(&copy))));
}
