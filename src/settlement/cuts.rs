//! How a job's input span is cut into parts that hold given shares of its input (the job
//! gives the larger ones first and smaller ones last, see [`super::plan`]), so the parts, taken
//! in turn by the job's runners, keep every runner busy until the end.

use super::input::Window;

/// The `(lo_id, hi_id]` id ranges of parts covering `window`'s span without overlap, in order,
/// one per weight, each holding about its weight's share of the input (see `cuts` below).
pub fn spans(window: &Window, weights: &[u32]) -> Vec<(i64, i64)> {
    let hi = window.last_id.max(window.after_id);
    let bounds: Vec<i64> = [window.after_id]
        .into_iter()
        .chain(cuts(window, weights))
        .chain([hi])
        .collect();
    bounds.windows(2).map(|w| (w[0], w[1])).collect()
}

/// The running sums of `weights` but the last (where the cuts fall, in shares of `sum`), and
/// `sum`; a list without weight counts as one part.
fn shares(weights: &[u32]) -> (Vec<i128>, i128) {
    let mut sum = 0;
    let mut ends: Vec<i128> = weights
        .iter()
        .map(|&w| {
            sum += i128::from(w.max(1));
            sum
        })
        .collect();
    ends.pop();
    (ends, sum.max(1))
}

/// The last quarter hour (by first id) counts at most this many typical quarter hours (the
/// 90th percentile): no quarter hour after it tells its own rows from rows posted later.
const LAST_AT_MOST: i64 = 2;

/// Where `window`'s span is cut into parts of `weights`: the last id of each part but the last,
/// at the weights' shares of the input as its quarter hours place it (`window.quarters`: each
/// one's first and last id). Ids are drawn in time order, so a quarter hour's rows are taken to
/// run from its first id to its last or, where that reaches past the next quarter hour's first
/// (a row posted late), to just before that; the last quarter hour's run is at most
/// [`LAST_AT_MOST`] typical ones. So a few rows posted days late, which stretch a day's span
/// over days of other ids, do not leave the whole day to the first part as cutting by width
/// would, and a flash sale's quarter hour counts all its rows. Where the median quarter hour
/// reaches over half the span (rows loaded out of time order, sorted by merchant, say) or there
/// are no quarter hours (a span from [`super::input::edges`] or [`super::input::window`]), the
/// cuts are at the weights' shares of the width.
fn cuts(window: &Window, weights: &[u32]) -> Vec<i64> {
    let (lo, hi) = (window.after_id, window.last_id.max(window.after_id));
    let (ends, sum) = shares(weights);
    let of = |whole: i64, end: i128| (i128::from(whole) * end / sum) as i64;
    let mut quarters = window.quarters.clone();
    quarters.sort_unstable();
    let mut reaches: Vec<i64> = quarters.iter().map(|&(first, last)| last - first).collect();
    reaches.sort_unstable();
    let interleaved = reaches
        .get(reaches.len() / 2)
        .is_none_or(|&r| r > (hi - lo) / 2);
    if interleaved {
        return ends.iter().map(|&end| lo + of(hi - lo, end)).collect();
    }
    // Each quarter hour's run of rows: `(first id, ids)`, disjoint, in id order.
    let mut runs: Vec<(i64, i64)> = quarters
        .windows(2)
        .map(|w| {
            let ((first, last), (next, _)) = (w[0], w[1]);
            (first, last.min(next - 1).max(first) - first + 1)
        })
        .collect();
    let mut widths: Vec<i64> = runs.iter().map(|&(_, ids)| ids).collect();
    widths.sort_unstable();
    let most = widths
        .get(widths.len() * 9 / 10)
        .map_or(i64::MAX, |&typical| typical.saturating_mul(LAST_AT_MOST));
    let &(first, last) = quarters.last().expect("not interleaved, so not empty");
    runs.push((first, (last.max(first) - first).saturating_add(1).min(most)));
    let total: i64 = runs.iter().map(|&(_, ids)| ids).sum();
    let mut cuts = Vec::with_capacity(ends.len());
    let (mut counted, mut runs) = (0, runs.into_iter().peekable());
    for end in ends {
        let share = of(total, end);
        while let Some(&(_, ids)) = runs.peek() {
            if counted + ids > share {
                break;
            }
            counted += ids;
            runs.next();
        }
        let cut = runs
            .peek()
            .map_or(hi, |&(first, _)| first - 1 + (share - counted));
        cuts.push(cut.clamp(cuts.last().copied().unwrap_or(lo), hi));
    }
    cuts
}

#[cfg(test)]
mod tests {
    use super::{Window, spans};

    fn window(after_id: i64, last_id: i64, quarters: Vec<(i64, i64)>) -> Window {
        Window {
            after_id,
            last_id,
            bound: None,
            quarters,
        }
    }

    /// The `n` equal parts of `window`, checked as [`weighed`] checks them.
    fn parts(window: &Window, n: u32) -> Vec<(i64, i64)> {
        weighed(window, &vec![1; n as usize])
    }

    /// The parts of `window` of `weights`, checked to cover its span without overlap.
    fn weighed(window: &Window, weights: &[u32]) -> Vec<(i64, i64)> {
        let parts = spans(window, weights);
        assert_eq!(parts.len(), weights.len().max(1));
        assert_eq!(parts[0].0, window.after_id);
        assert_eq!(parts.last().unwrap().1, window.last_id.max(window.after_id));
        for pair in parts.windows(2) {
            assert_eq!(pair[0].1, pair[1].0);
        }
        assert!(parts.iter().all(|(lo, hi)| lo <= hi));
        parts
    }

    #[test]
    fn without_quarter_hours_parts_have_equal_widths() {
        for (lo, hi, n) in [(0, 10, 3), (5, 5, 2), (0, 1, 4), (100, 1_000_000, 2)] {
            parts(&window(lo, hi, Vec::new()), n);
        }
        assert_eq!(
            parts(&window(0, 9, Vec::new()), 3),
            [(0, 3), (3, 6), (6, 9)]
        );
    }

    /// Quarter hours in time order from id 1, each holding the next `widths` ids.
    fn consecutive(widths: impl IntoIterator<Item = i64>) -> Vec<(i64, i64)> {
        let mut next = 1;
        widths
            .into_iter()
            .map(|ids| {
                next += ids;
                (next - ids, next - 1)
            })
            .collect()
    }

    /// A day of 96 quarter hours of 100 ids each from id 1 (in time order).
    fn day() -> Vec<(i64, i64)> {
        consecutive([100; 96])
    }

    #[test]
    fn a_day_in_time_order_is_cut_into_thirds() {
        let cut = parts(&window(0, 9_600, day()), 3);
        assert_eq!(cut, [(0, 3_200), (3_200, 6_400), (6_400, 9_600)]);
        // A span that holds a little of nothing, and a part for nearly every quarter hour.
        for n in [1, 2, 5, 95, 96, 200] {
            parts(&window(0, 9_601, day()), n);
        }
    }

    /// Three parts of [`day`]'s rows, each cut within a quarter hour of a third.
    fn assert_near_thirds_of_a_day(cut: &[(i64, i64)]) {
        assert!((3_100..=3_300).contains(&cut[0].1), "{cut:?}");
        assert!((6_300..=6_500).contains(&cut[1].1), "{cut:?}");
    }

    #[test]
    fn parts_hold_their_weights_share_of_the_rows() {
        // Large parts first, small ones last: 6, 6, 6, 2, 2, 2, 1, 1, 1 twenty-sevenths.
        let weights = [6, 6, 6, 2, 2, 2, 1, 1, 1];
        let cut = weighed(&window(0, 9_600, day()), &weights);
        let ends: Vec<i64> = cut.iter().map(|&(_, hi)| hi).collect();
        assert_eq!(
            ends,
            [
                2_133, 4_266, 6_400, 7_111, 7_822, 8_533, 8_888, 9_244, 9_600
            ]
        );
        // Without quarter hours, the same shares of the width.
        let cut = weighed(&window(0, 2_700, Vec::new()), &weights);
        let widths: Vec<i64> = cut.iter().map(|&(lo, hi)| hi - lo).collect();
        assert_eq!(widths, [600, 600, 600, 200, 200, 200, 100, 100, 100]);
    }

    #[test]
    fn rows_posted_days_late_do_not_stretch_the_first_part() {
        // The last quarter hour's last row was posted a month of ids later; so was the 11th's.
        let mut late = day();
        late[95].1 = 3_000_000;
        late[10].1 = 2_000_000;
        let cut = parts(&window(0, 3_000_000, late), 3);
        // The 11th's rows end where the 12th's begin; the last counts as two typical ones.
        assert_near_thirds_of_a_day(&cut);
    }

    #[test]
    fn a_flash_sale_counts_all_its_rows() {
        // The 41st quarter hour holds 9,500 rows, as many as the other 95 together.
        let quarters = consecutive((0..96).map(|q| if q == 40 { 9_500 } else { 100 }));
        assert_eq!(quarters[41].0, 13_501);
        let cut = parts(&window(0, 19_000, quarters), 2);
        assert_eq!(cut, [(0, 9_500), (9_500, 19_000)]);
    }

    #[test]
    fn rows_a_few_minutes_late_and_one_a_day_late() {
        // Each quarter hour's last rows come after the next one's first; the noon quarter
        // hour's last row came a day late.
        let mut late: Vec<(i64, i64)> = day().iter().map(|&(f, l)| (f, l + 30)).collect();
        late[48].1 = 500_000;
        let cut = parts(&window(0, 500_000, late), 3);
        assert_near_thirds_of_a_day(&cut);
    }

    #[test]
    fn busy_hours_are_cut_by_their_rows() {
        // 48 quiet quarter hours of 10 ids, then 48 busy ones of 100.
        let quarters = consecutive((0..96).map(|q| if q < 48 { 10 } else { 100 }));
        let cut = parts(&window(0, 5_280, quarters), 2);
        // Half of the 5,280 ids: the quiet 480 and 2,160 of the busy ones.
        assert_eq!(cut, [(0, 2_640), (2_640, 5_280)]);
    }

    #[test]
    fn any_quarter_hours_give_parts_that_cover_the_span() {
        use rand::rngs::StdRng;
        use rand::{RngExt, SeedableRng};
        let mut rng = StdRng::seed_from_u64(24);
        for _ in 0..2_000 {
            let after = rng.random_range(-5..1_000_000_i64);
            let quarters: Vec<(i64, i64)> = (0..rng.random_range(1..300))
                .map(|_| {
                    let first = after + rng.random_range(1..5_000_000);
                    (first, first + rng.random_range(0..100_000))
                })
                .collect();
            let last = quarters.iter().map(|&(_, last)| last).max().unwrap();
            let weights: Vec<u32> = (0..rng.random_range(1..12))
                .map(|_| rng.random_range(1..7))
                .collect();
            weighed(&window(after, last, quarters), &weights);
        }
    }

    #[test]
    fn rows_loaded_out_of_time_order_spread_over_the_span() {
        // Sorted by merchant: each quarter hour's rows run from near the start to near the end.
        let quarters: Vec<(i64, i64)> = (0..96).map(|q| (1 + q, 9_505 + q)).collect();
        let cut = parts(&window(0, 9_600, quarters), 3);
        assert!((3_150..=3_250).contains(&cut[0].1), "{cut:?}");
        assert!((6_350..=6_450).contains(&cut[1].1), "{cut:?}");
    }
}
