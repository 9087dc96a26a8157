use super::*;

const MIN: i64 = 60_000;

fn config() -> WindowConfig {
    WindowConfig {
        dimensions: vec![Dimension::parse("app").unwrap()],
        size_ms: MIN,
        lateness_ms: 2 * MIN,
        rollup_ms: 60 * MIN,
        max_series: 100,
        max_future_ms: 5 * MIN,
    }
}

/// Adds one event of series `app` at `ts` in lane 0; false when it was late.
fn add(w: &mut Windows<u64>, ts: i64, app: &str) -> bool {
    add_lane(w, ts, app, 0)
}

fn add_lane(w: &mut Windows<u64>, ts: i64, app: &str, lane: usize) -> bool {
    match w.slot_for(ts, &[Some(app)], lane) {
        Slot::Open(n) => {
            *n += 1;
            true
        }
        Slot::Late => false,
    }
}

fn totals(closed: &[Closed<u64>]) -> Vec<(i64, u64)> {
    closed
        .iter()
        .map(|c| (c.start_ms, c.series.iter().map(|(_, n)| n).sum()))
        .collect()
}

#[test]
fn windows_close_in_order_once_the_watermark_passes() {
    let mut w = Windows::new(config(), i64::MIN);
    let t0 = 1_000 * MIN;
    for i in 0..10 {
        add(&mut w, t0 + i * 10_000, "a"); // 6 per minute
    }
    // Newest event at t0 + 90 s: the watermark is t0 - 30 s; nothing can close.
    assert!(w.advance(None).is_empty());
    add(&mut w, t0 + 3 * MIN + 5_000, "a");
    // Watermark t0 + 65 s: the first minute closes, the second (ends t0 + 2 min) does not.
    let closed = w.advance(None);
    assert_eq!(totals(&closed), vec![(t0, 6)]);
    assert_eq!(closed[0].end_ms, t0 + MIN);
    assert_eq!(w.closed_through(), t0 + MIN);
    add(&mut w, t0 + 10 * MIN, "a");
    let closed = w.advance(None);
    assert_eq!(totals(&closed), vec![(t0 + MIN, 4), (t0 + 3 * MIN, 1)]);
    assert_eq!(w.closed_through(), t0 + 8 * MIN);
}

#[test]
fn out_of_order_events_count_until_their_window_closes_then_are_late() {
    let mut w = Windows::new(config(), i64::MIN);
    let t0 = 1_000 * MIN;
    assert!(add(&mut w, t0 + 2 * MIN + 30_000, "a"));
    // 2.5 minutes behind the newest event, but its window is still open: counted.
    assert!(add(&mut w, t0 + 1_000, "a"));
    add(&mut w, t0 + 3 * MIN + 1, "a");
    let closed = w.advance(None);
    assert_eq!(totals(&closed), vec![(t0, 1)]);
    // The first minute is closed now: a straggler for it is late, and nothing reopens.
    assert!(!add(&mut w, t0 + 59_000, "a"));
    assert_eq!(w.late_events(), 1);
    assert!(w.advance(None).is_empty());
    // A restart that recorded the close position treats it the same way.
    let mut again: Windows<u64> = Windows::new(config(), t0 + MIN);
    assert!(!add(&mut again, t0 + 59_000, "a"));
    assert!(add(&mut again, t0 + MIN, "a"));
}

#[test]
fn series_cap_folds_new_series_into_other_and_frees_closed_ones() {
    let mut cfg = config();
    cfg.max_series = 3;
    let mut w = Windows::new(cfg, i64::MIN);
    let t0 = 1_000 * MIN;
    for app in ["a", "b", "c", "d", "e", "d"] {
        add(&mut w, t0, app);
    }
    assert_eq!(w.live_series(), 3);
    assert_eq!(w.overflowed_events(), 3);
    add(&mut w, t0 + 10 * MIN, "z"); // a fourth series in a later window: still over the cap
    assert_eq!(w.overflowed_events(), 4);
    let closed = w.advance(None);
    let first = &closed[0];
    let other: Vec<_> = first
        .series
        .iter()
        .filter(|(k, _)| k.values()[0].as_deref() == Some(OTHER))
        .collect();
    assert_eq!(other.len(), 1);
    assert_eq!(other[0].1, 3, "d, e, d went to __other__");
    assert_eq!(first.series.len(), 4);
    // Only the later window is open; its series was folded into __other__, so none is live.
    assert_eq!(w.live_series(), 0);
    // Room again: a new series gets its own state.
    add(&mut w, t0 + 10 * MIN, "y");
    assert_eq!(w.live_series(), 1);
    assert_eq!(w.overflowed_events(), 4);
}

#[test]
fn a_lagging_partition_holds_the_watermark_an_idle_one_does_not() {
    let mut w = Windows::new(config(), i64::MIN);
    let t0 = 1_000 * MIN;
    let now = t0 + 60 * MIN;
    // Lane 0 is caught up, lane 1 is 20 minutes behind (a backlog being read).
    add_lane(&mut w, t0 + 30 * MIN, "a", 0);
    add_lane(&mut w, t0 + 10 * MIN, "a", 1);
    let closed = w.advance(Some(now));
    assert!(closed.iter().all(|c| c.end_ms <= t0 + 8 * MIN));
    // Lane 1's events inside the 20 minutes are not late.
    assert!(add_lane(&mut w, t0 + 10 * MIN + 1, "a", 1));
    w.advance(Some(now + 1_000));
    // Lane 1 then goes quiet for longer than the lateness: it stops holding the watermark.
    add_lane(&mut w, t0 + 31 * MIN, "a", 0);
    w.advance(Some(now + 2_000));
    add_lane(&mut w, t0 + 32 * MIN, "a", 0);
    w.advance(Some(now + 3 * MIN));
    assert_eq!(w.closed_through(), t0 + 30 * MIN);
}

#[test]
fn a_registered_partition_holds_the_watermark_until_it_speaks_or_idles() {
    let mut w = Windows::new(config(), i64::MIN);
    let t0 = 1_000 * MIN;
    let now = t0 + 200 * MIN;
    // Two partitions assigned; the first is read to its end before the second delivers.
    w.register_lane(0, now);
    w.register_lane(1, now);
    add_lane(&mut w, t0, "a", 0);
    add_lane(&mut w, t0 + 120 * MIN, "a", 0);
    assert!(
        w.advance(Some(now)).is_empty(),
        "partition 1 has not spoken yet"
    );
    assert!(
        add_lane(&mut w, t0 + 5_000, "a", 1),
        "so its old events are not late"
    );
    let closed = w.advance(Some(now + 1_000));
    assert_eq!(totals(&closed), vec![]);
    // A partition that never delivers stops holding the watermark after `lateness`.
    let mut q = Windows::new(config(), i64::MIN);
    q.register_lane(0, now);
    q.register_lane(1, now);
    add_lane(&mut q, t0, "a", 0);
    add_lane(&mut q, t0 + 10 * MIN, "a", 0);
    assert!(q.advance(Some(now + 60_000)).is_empty());
    add_lane(&mut q, t0 + 11 * MIN, "a", 0);
    assert_eq!(totals(&q.advance(Some(now + 2 * MIN + 1))), vec![(t0, 1)]);
}

#[test]
fn times_near_the_ends_of_the_range_do_not_overflow() {
    let mut w: Windows<u64> = Windows::new(config(), i64::MIN);
    assert_eq!(w.window_start(i64::MIN + 5), i64::MIN);
    assert_eq!(w.window_start(-1), -MIN);
    // A registered lane with no events yet: the watermark sits at the bottom of the range.
    w.register_lane(0, 1_000 * MIN);
    assert!(w.advance(Some(1_000 * MIN)).is_empty());
    assert!(add(&mut w, i64::MAX - 1, "a"));
    w.advance(Some(1_000 * MIN));
}

#[test]
fn an_idle_source_closes_its_last_windows_by_wall_clock() {
    let mut w = Windows::new(config(), i64::MIN);
    let t0 = 1_000 * MIN;
    add(&mut w, t0 + 1_000, "a");
    assert!(w.advance(Some(t0 + 2_000)).is_empty());
    assert!(
        w.advance(Some(t0 + 60_000)).is_empty(),
        "idle, but not for long"
    );
    let closed = w.advance(Some(t0 + 4 * MIN));
    assert_eq!(totals(&closed), vec![(t0, 1)]);
    // Event time alone (backfills) never consults the clock.
    let mut b = Windows::new(config(), i64::MIN);
    add(&mut b, t0 + 1_000, "a");
    for _ in 0..5 {
        assert!(b.advance(None).is_empty());
    }
    assert_eq!(totals(&b.close_all()), vec![(t0, 1)]);
}

#[test]
fn a_timestamp_from_the_future_does_not_close_everything() {
    let mut w = Windows::new(config(), i64::MIN);
    let t0 = 1_000 * MIN;
    w.advance(Some(t0));
    add(&mut w, t0 + 1_000, "a");
    add(&mut w, t0 + 365 * 24 * 60 * MIN, "skewed-clock");
    let closed = w.advance(Some(t0 + 1_000));
    // The far-future event moves the watermark only to now + 5 min − lateness.
    assert_eq!(totals(&closed), vec![(t0, 1)]);
    assert_eq!(w.closed_through(), t0 + 3 * MIN);
    assert!(
        add(&mut w, t0 + 3 * MIN, "a"),
        "later windows are still open"
    );
}

#[test]
fn rollup_merges_closed_windows_and_closes_at_its_end() {
    let mut r: Rollup<u64> = Rollup::new(60 * MIN);
    let key = SeriesKey::new(&[Some("a")]);
    let h0 = 1_000 * 60 * MIN;
    for m in 0..60 {
        assert!(
            r.add(h0 + m * MIN, [(key.clone(), 2)], |a, b| *a += b)
                .is_none()
        );
    }
    assert!(r.close_before(h0 + 59 * MIN).is_none());
    let done = r.close_before(h0 + 60 * MIN).expect("the hour is complete");
    assert_eq!(done.series, vec![(key.clone(), 120)]);
    // A window of a later hour completes the earlier one too.
    r.add(h0 + 60 * MIN, [(key.clone(), 1)], |a, b| *a += b);
    let done = r.add(h0 + 125 * MIN, [(key, 1)], |a, b| *a += b).unwrap();
    assert_eq!(done.start_ms, h0 + 60 * MIN);
}

#[test]
fn dimensions_parse_with_clear_errors() {
    assert_eq!(Dimension::parse("model"), Ok(Dimension::Field(4)));
    assert_eq!(Dimension::Field(4).to_string(), "model");
    assert_eq!(
        Dimension::parse("attributes.team"),
        Ok(Dimension::Attribute("team".into()))
    );
    assert_eq!(
        Dimension::parse("attributes.team").unwrap().column(),
        "attr_team"
    );
    let err = Dimension::parse("modle").unwrap_err();
    assert!(
        err.contains("unknown dimension") && err.contains("model"),
        "{err}"
    );
    let e = LlmEvent {
        model: Some("m".into()),
        attributes: vec![("team".into(), "x".into())],
        ..Default::default()
    };
    assert_eq!(Dimension::parse("model").unwrap().value(&e), Some("m"));
    assert_eq!(Dimension::Attribute("team".into()).value(&e), Some("x"));
    assert_eq!(Dimension::parse("app").unwrap().value(&e), None);
    // Every listed field reads its own value.
    let named = LlmEvent {
        app: Some("app".into()),
        environment: Some("environment".into()),
        operation: Some("operation".into()),
        provider: Some("provider".into()),
        model: Some("model".into()),
        response_model: Some("response_model".into()),
        prompt_id: Some("prompt_id".into()),
        prompt_version: Some("prompt_version".into()),
        variant: Some("variant".into()),
        experiment: Some("experiment".into()),
        status: "status".into(),
        finish_reason: Some("finish_reason".into()),
        error_type: Some("error_type".into()),
        ..Default::default()
    };
    for (i, f) in DIMENSION_FIELDS.iter().enumerate() {
        assert_eq!(Dimension::Field(i).column(), *f);
        assert_eq!(Dimension::Field(i).value(&named), Some(*f));
    }
}
