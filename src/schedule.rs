//! The daily schedule: every worker process runs [`run`], which from `schedule.at` local time
//! on enqueues a settlement of the previous day. Exactly once per day however many workers run,
//! restart or are killed: the job is enqueued in one transaction with a `scheduled_runs` row
//! keyed by the day (migration 0012), so of workers racing for a day one commits and the others
//! meet the key and roll back; a worker killed mid-way rolls back and leaves the day to the
//! next one that looks. No leader: each worker only remembers which day it last saw done, to
//! spare the database a write per look.
//!
//! What is due is judged by the database's clock, one for every worker: a worker whose own clock
//! ran ahead would enqueue a day before it ended, and the job would miss the day's late input
//! for good. A worker starting after downtime catches up the days missed since the newest one
//! enqueued, up to `schedule.catch_up_days` of the most recent ([`Schedule::to_enqueue`]);
//! older missed days are logged for an operator to enqueue.
//! Settlement knowledge stays here, outside the queue crate, which only sees a job.

use std::time::Duration;

use chrono::{DateTime, Days, NaiveDate, NaiveTime, TimeZone, Utc};
use chrono_tz::Tz;
use settle_workers::NewJob;
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::settlement::DateRange;
use crate::settlement::job::KIND;

/// The `scheduled_runs.schedule` of the daily settlement.
pub const DAILY_SETTLEMENT: &str = "daily_settlement";

/// When the daily settlement is due, from `[schedule]`.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// Local time of day from which the previous day is due.
    at: NaiveTime,
    /// The zone of `at`'s wall clock.
    zone: Tz,
    /// The zone whose calendar days the settlements are (`settlement.time_zone`), in which
    /// "the previous day" is counted (see [`Schedule::due_day`]).
    settlement_zone: Tz,
    /// Longest sleep between two looks at the clock.
    check_interval: Duration,
    /// Attempts of each enqueued job (`worker.max_attempts`, as for the API's jobs).
    max_attempts: i32,
    /// After downtime, how many of the most recent missed days are enqueued (at least 1).
    catch_up_days: u64,
}

/// The days to enqueue at one look: `first..=last`, and the missed days older than the
/// catch-up allows, which are left to an operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Due {
    pub first: NaiveDate,
    pub last: NaiveDate,
    pub skipped: Option<(NaiveDate, NaiveDate)>,
}

impl Schedule {
    /// The schedule of `config`, or `None` when `schedule.enabled` is off.
    pub fn from_config(config: &Config) -> Option<Self> {
        let schedule = &config.schedule;
        if !schedule.enabled {
            return None;
        }
        let zone = schedule
            .time_zone
            .as_deref()
            .unwrap_or(&config.settlement.time_zone);
        Some(Self {
            // Both checked by `Config::validate`.
            at: schedule.at_time().unwrap_or(NaiveTime::MIN),
            zone: zone.parse().unwrap_or(Tz::UTC),
            settlement_zone: config.settlement.time_zone.parse().unwrap_or(Tz::UTC),
            check_interval: Duration::from_millis(schedule.check_interval_ms),
            max_attempts: config.worker.max_attempts,
            catch_up_days: schedule.catch_up_days.max(1),
        })
    }

    /// The days to enqueue at `now`, the newest day enqueued so far being `enqueued`: the
    /// [`Self::due_days`], and before them the days missed since `enqueued` (the schedule off,
    /// every worker stopped or the database unreachable past one or more strikes of `at`), of
    /// which at most the `catch_up_days` most recent, counted back from the last due day.
    pub fn to_enqueue(&self, now: DateTime<Utc>, enqueued: Option<NaiveDate>) -> Due {
        let (first, last) = self.due_days(now);
        let Some(missed) = enqueued
            .and_then(|day| day.succ_opt())
            .filter(|d| *d < first)
        else {
            return Due {
                first,
                last,
                skipped: None,
            };
        };
        let window = last
            .checked_sub_days(Days::new(self.catch_up_days - 1))
            .unwrap_or(NaiveDate::MIN);
        let start = missed.max(window).min(first);
        let skipped = (missed < start).then(|| (missed, start.pred_opt().unwrap_or(missed)));
        Due {
            first: start,
            last,
            skipped,
        }
    }

    /// The most recent day whose settlement is due at `now`: the settlement zone's day before
    /// the one in which `at` last struck on the schedule's wall clock. With one zone for both,
    /// that is yesterday once today's `at` has passed, else the day before. Compared on the
    /// wall clock, so a DST jump over `at` still makes the day due (at the jump), and a
    /// repeated hour does not make it due twice. With `at` 00:30 in Paris over settlements in
    /// UTC, 00:30 in Paris is 23:30 UTC: the day due then is the UTC day before, which has
    /// ended (its input is fixed when the job starts, so a job for a day not yet over would
    /// miss the rest of it for good), and the day that was still running comes at the next
    /// 00:30 in Paris, with the same margin the schedule gives everywhere.
    pub fn due_day(&self, now: DateTime<Utc>) -> NaiveDate {
        self.settled_at(self.last_strike(now), now)
    }

    /// The days due at `now`: [`Self::due_day`], and before it any day the previous strike of
    /// `at` did not make due. Where the two zones differ and one changes its offset, the
    /// instant `at` strikes can move across the settlement zone's midnight: with `at` 00:30 in
    /// London over settlements in UTC, 00:30 on 26 October 2025 is 23:30 UTC on the 25th (the
    /// 24th due), and 00:30 on the 27th is 00:30 UTC (the 26th due): the 25th is due with it.
    pub fn due_days(&self, now: DateTime<Utc>) -> (NaiveDate, NaiveDate) {
        let struck = self.last_strike(now);
        let last = self.settled_at(struck, now);
        let before = self.settled_at(struck - chrono::Duration::days(1), now);
        ((before + Days::new(1)).min(last), last)
    }

    /// The wall-clock time `at` last struck at `now`.
    fn last_strike(&self, now: DateTime<Utc>) -> chrono::NaiveDateTime {
        let local = now.with_timezone(&self.zone).naive_local();
        let back = if local.time() >= self.at { 0 } else { 1 };
        (local.date() - Days::new(back)).and_time(self.at)
    }

    /// The settlement zone's day before the one in which `at` struck at wall-clock `struck`.
    fn settled_at(&self, struck: chrono::NaiveDateTime, now: DateTime<Utc>) -> NaiveDate {
        // The instant `at` struck: the earlier of a repeated time, the jump's end in a gap.
        let instant = (0..=12)
            .find_map(|quarters| {
                let wall = struck + chrono::Duration::minutes(15 * quarters);
                self.zone.from_local_datetime(&wall).earliest()
            })
            .map_or(now, |at| at.with_timezone(&Utc).min(now));
        instant.with_timezone(&self.settlement_zone).date_naive() - Days::new(1)
    }

    /// How long to sleep at `now` once the due day is done: until the next `at` on the wall
    /// clock, at most the check interval (which also absorbs DST and clock changes).
    fn sleep_after_done(&self, now: DateTime<Utc>) -> Duration {
        let local = now.with_timezone(&self.zone).naive_local();
        let mut next = local.date().and_time(self.at);
        if next <= local {
            next += chrono::Duration::days(1);
        }
        (next - local)
            .to_std()
            .unwrap_or_default()
            .min(self.check_interval)
    }
}

/// Enqueues the due days' settlements whenever they are not done yet, until `shutdown`.
pub async fn run(pool: PgPool, schedule: Schedule, shutdown: CancellationToken) {
    tracing::info!(at = %schedule.at, zone = %schedule.zone, "daily settlement scheduled");
    // Every day up to this one is enqueued (by this worker or another).
    let mut done: Option<NaiveDate> = None;
    // The last missed day this worker said it would not catch up.
    let mut warned: Option<NaiveDate> = None;
    while !shutdown.is_cancelled() {
        let sleep = match look(&pool).await {
            Ok((now, enqueued)) => {
                let due = schedule.to_enqueue(now, enqueued);
                if let Some((from, to)) = due.skipped.filter(|(_, to)| warned != Some(*to)) {
                    tracing::warn!(
                        %from, %to, catch_up_days = schedule.catch_up_days,
                        "missed days not caught up (schedule.catch_up_days): enqueue them with \
                         POST /api/v1/jobs/settlement if they are wanted"
                    );
                    warned = Some(to);
                }
                for day in due.first.iter_days().take_while(|day| *day <= due.last) {
                    if done.is_some_and(|done| done >= day) {
                        continue;
                    }
                    match enqueue_once(&pool, day, schedule.max_attempts).await {
                        Ok(Some(job_id)) => {
                            tracing::info!(%day, job_id, "enqueued the scheduled settlement");
                            done = Some(day);
                        }
                        Ok(None) => done = Some(day),
                        Err(e) => {
                            tracing::warn!(%day, error = %e, "scheduling the settlement failed");
                            break;
                        }
                    }
                }
                match done >= Some(due.last) {
                    true => schedule.sleep_after_done(now),
                    false => schedule.check_interval,
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading the schedule's clock failed");
                schedule.check_interval
            }
        };
        tokio::select! {
            () = tokio::time::sleep(sleep) => {}
            () = shutdown.cancelled() => {}
        }
    }
}

/// The database's clock, and the newest day the schedule has enqueued (if any).
async fn look(pool: &PgPool) -> Result<(DateTime<Utc>, Option<NaiveDate>), sqlx::Error> {
    let row = sqlx::query!(
        r#"select now() as "now!",
                  (select max(day) from scheduled_runs where schedule = $1) as enqueued"#,
        DAILY_SETTLEMENT,
    )
    .fetch_one(pool)
    .await?;
    Ok((row.now, row.enqueued))
}

/// Enqueues a settlement of `day` unless one was enqueued for it before; returns the new job's
/// id, or `None` when the day was already done (by this worker or another).
pub async fn enqueue_once(
    pool: &PgPool,
    day: NaiveDate,
    max_attempts: i32,
) -> anyhow::Result<Option<i64>> {
    let range = DateRange::new(day, day, i64::MAX)?;
    let job = NewJob::new(KIND, serde_json::to_value(range.to_input())?).max_attempts(max_attempts);
    let mut tx = pool.begin().await?;
    let job_id = settle_workers::enqueue(&mut tx, &job).await?;
    if !mark_day(&mut tx, day, job_id).await? {
        // Another transaction has the day: this job must not exist either.
        tx.rollback().await?;
        return Ok(None);
    }
    tx.commit().await?;
    Ok(Some(job_id))
}

/// Records that `day` was enqueued as `job_id`; false when it already was. A concurrent
/// transaction recording the same day makes this wait for its end.
async fn mark_day(
    conn: &mut PgConnection,
    day: NaiveDate,
    job_id: i64,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query!(
        "insert into scheduled_runs (schedule, day, job_id) values ($1, $2, $3)
         on conflict on constraint scheduled_run_once_per_day do nothing",
        DAILY_SETTLEMENT,
        day,
        job_id,
    )
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(at: &str, zone: &str) -> Schedule {
        settling_in(at, zone, zone)
    }

    fn settling_in(at: &str, zone: &str, settlement_zone: &str) -> Schedule {
        Schedule {
            at: at.parse().unwrap(),
            zone: zone.parse().unwrap(),
            settlement_zone: settlement_zone.parse().unwrap(),
            check_interval: Duration::from_secs(60),
            max_attempts: 5,
            catch_up_days: 3,
        }
    }

    fn utc(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    /// The day `schedule` finds due at `now`, as `YYYY-MM-DD`.
    fn due(schedule: &Schedule, now: &str) -> String {
        schedule.due_day(utc(now)).to_string()
    }

    #[test]
    fn yesterday_is_due_from_the_local_time_on() {
        let s = schedule("00:30:00", "UTC");
        assert_eq!(due(&s, "2025-03-10T00:29:59Z"), "2025-03-08");
        assert_eq!(due(&s, "2025-03-10T00:30:00Z"), "2025-03-09");
        assert_eq!(due(&s, "2025-03-10T23:59:59Z"), "2025-03-09");
        // Local days: 00:30 in Paris (UTC+1 in winter) is 23:30 UTC the evening before.
        let paris = schedule("00:30:00", "Europe/Paris");
        assert_eq!(due(&paris, "2025-01-09T23:29:00Z"), "2025-01-08");
        assert_eq!(due(&paris, "2025-01-09T23:30:00Z"), "2025-01-09");
    }

    #[test]
    fn a_day_is_due_only_once_it_has_ended_in_the_settlement_zone() {
        // 00:30 in Paris is 23:30 UTC: the UTC day of the 9th has half an hour to go, so the
        // 8th is due, and the 9th at the next 00:30 in Paris.
        let paris = settling_in("00:30:00", "Europe/Paris", "UTC");
        assert_eq!(due(&paris, "2025-01-09T23:29:59Z"), "2025-01-07");
        assert_eq!(due(&paris, "2025-01-09T23:30:00Z"), "2025-01-08");
        assert_eq!(due(&paris, "2025-01-10T00:00:00Z"), "2025-01-08");
        assert_eq!(due(&paris, "2025-01-10T23:30:00Z"), "2025-01-09");
        // West of the settlement zone the day has long ended by then.
        let new_york = settling_in("00:30:00", "America/New_York", "UTC");
        assert_eq!(due(&new_york, "2025-01-10T05:30:00Z"), "2025-01-09");
    }

    #[test]
    fn a_dst_jump_over_the_time_still_makes_the_day_due() {
        // 2025-03-30 in Paris: 02:00 jumps to 03:00, so 02:30 never happens on the clock.
        let s = schedule("02:30:00", "Europe/Paris");
        assert_eq!(due(&s, "2025-03-30T00:59:00Z"), "2025-03-28");
        assert_eq!(due(&s, "2025-03-30T01:00:00Z"), "2025-03-29");
    }

    /// Every day of 2025 is due at some look, in order, when looking every quarter hour, for
    /// zones whose offsets change on different dates.
    #[test]
    fn no_day_is_skipped_when_the_zones_change_their_clocks_apart() {
        for (at, zone, settling) in [
            ("00:30:00", "Europe/London", "UTC"),
            ("01:30:00", "Europe/Paris", "UTC"),
            ("04:30:00", "UTC", "America/New_York"),
            ("00:30:00", "Europe/London", "America/New_York"),
            ("23:45:00", "Australia/Sydney", "Europe/Berlin"),
        ] {
            let s = settling_in(at, zone, settling);
            let mut next = s.due_day(utc("2025-01-01T00:00:00Z"));
            let mut now = utc("2025-01-01T00:00:00Z");
            while now < utc("2026-01-01T00:00:00Z") {
                let (first, last) = s.due_days(now);
                let gap = first > next + Days::new(1);
                assert!(
                    !gap,
                    "{zone} over {settling}: {first} due after {next} at {now}"
                );
                next = next.max(last);
                now += chrono::Duration::minutes(15);
            }
            assert!(
                next >= "2025-12-29".parse().unwrap(),
                "{zone} over {settling}"
            );
        }
    }

    #[test]
    fn the_day_a_clock_change_skips_is_due_with_the_next() {
        let london = settling_in("00:30:00", "Europe/London", "UTC");
        let on = |now: &str| {
            let (first, last) = london.due_days(utc(now));
            format!("{first}..{last}")
        };
        assert_eq!(on("2025-10-25T23:31:00Z"), "2025-10-24..2025-10-24");
        assert_eq!(on("2025-10-27T00:31:00Z"), "2025-10-25..2025-10-26");
        assert_eq!(on("2025-10-28T00:31:00Z"), "2025-10-27..2025-10-27");
    }

    #[test]
    fn the_sleep_ends_at_the_next_time_or_the_check_interval() {
        let s = schedule("00:30:00", "UTC");
        assert_eq!(
            s.sleep_after_done(utc("2025-03-10T00:29:50Z")),
            Duration::from_secs(10)
        );
        assert_eq!(
            s.sleep_after_done(utc("2025-03-10T00:30:00Z")),
            Duration::from_secs(60)
        );
    }

    #[test]
    fn missed_days_are_caught_up_to_the_limit_and_the_rest_named() {
        let s = schedule("00:30:00", "UTC");
        let on = |now: &str, enqueued: Option<&str>| {
            let due = s.to_enqueue(utc(now), enqueued.map(|d| d.parse().unwrap()));
            let skipped = due
                .skipped
                .map(|(from, to)| format!(" skipped {from}..{to}"));
            format!("{}..{}{}", due.first, due.last, skipped.unwrap_or_default())
        };
        // Never enqueued before, or nothing missed: the due day alone.
        assert_eq!(on("2025-03-10T01:00:00Z", None), "2025-03-09..2025-03-09");
        let caught_up = on("2025-03-10T01:00:00Z", Some("2025-03-08"));
        assert_eq!(caught_up, "2025-03-09..2025-03-09");
        assert_eq!(
            on("2025-03-10T01:00:00Z", Some("2025-03-09")),
            "2025-03-09..2025-03-09"
        );
        // Down two days: both missed days with the due one.
        let down = on("2025-03-10T01:00:00Z", Some("2025-03-06"));
        assert_eq!(down, "2025-03-07..2025-03-09");
        // Down longer: the three most recent (catch_up_days 3), the older ones named.
        let long = on("2025-03-10T01:00:00Z", Some("2025-03-01"));
        assert_eq!(
            long,
            "2025-03-07..2025-03-09 skipped 2025-03-02..2025-03-06"
        );
        // Before `at`, counted back from the day then due.
        let early = on("2025-03-10T00:10:00Z", Some("2025-03-01"));
        assert_eq!(
            early,
            "2025-03-06..2025-03-08 skipped 2025-03-02..2025-03-05"
        );
    }
}
