//! Series and event-time windows, shared by every stage that aggregates (metrics, drift,
//! quality, experiments).
//!
//! A *series* is the tuple of the configured dimensions of an event (default `app,
//! environment, model, prompt_version`). Windows are tumbling, in event time: an event at `t`
//! belongs to `[t - t mod size, … + size)`.
//!
//! The **watermark** follows event time per *lane* (a source partition): each lane's largest
//! event time (capped at `now + max_future` so one record from a skewed clock cannot close
//! everything), and the watermark is the smallest of them over the lanes active in the last
//! `lateness` of wall-clock time, minus the allowed lateness. Taking the minimum keeps a
//! partition that is consumed ahead of the others (a backlog being caught up) from making the
//! others' events late; leaving idle lanes out keeps a quiet partition from holding every
//! window open. A window closes, in order, once the watermark passes its end. When the whole
//! source has been idle for `lateness`, the watermark also follows the wall clock, so the last
//! windows of a quiet stream close instead of waiting for the next event. A lane registered
//! before its first event (a partition just assigned) holds the watermark until it delivers
//! one or has been silent for `lateness`.
//!
//! An event whose window is already closed is **late**: it is counted (see
//! [`Windows::late_events`]) and, like every event, written to `events`, but it changes no
//! closed window. Closed windows are never reopened.
//!
//! Live series are capped: past `max_series`, new series are folded into one `__other__`
//! series and counted, so a high-cardinality dimension cannot exhaust memory. A series is live
//! while it has state in an open window.
//!
//! Coarser windows ([`Rollup`]) are built by merging closed finer windows, never by re-reading
//! events. The clock is always passed in, so tests run on a simulated one.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::event::LlmEvent;

/// The value every dimension of the overflow series takes.
pub const OTHER: &str = "__other__";

/// One dimension of the series key: an event field or an attribute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dimension {
    /// An event field, as its index in [`DIMENSION_FIELDS`] (matching on an index, not on the
    /// name, keeps string comparisons off the per-event path).
    Field(usize),
    /// `attributes.<key>`.
    Attribute(String),
}

/// Event fields a series can be keyed by (the order is [`Dimension::Field`]'s index).
pub const DIMENSION_FIELDS: &[&str] = &[
    "app",
    "environment",
    "operation",
    "provider",
    "model",
    "response_model",
    "prompt_id",
    "prompt_version",
    "variant",
    "experiment",
    "status",
    "finish_reason",
    "error_type",
];

impl Dimension {
    /// Parses a field name or `attributes.<key>`.
    pub fn parse(s: &str) -> Result<Dimension, String> {
        if let Some(key) = s.strip_prefix("attributes.") {
            if key.is_empty() {
                return Err("an attribute dimension needs a key (attributes.<key>)".into());
            }
            return Ok(Dimension::Attribute(key.to_owned()));
        }
        DIMENSION_FIELDS
            .iter()
            .position(|f| *f == s)
            .map(Dimension::Field)
            .ok_or_else(|| {
                format!(
                    "unknown dimension {s:?} (expected one of: {}, or attributes.<key>)",
                    DIMENSION_FIELDS.join(", ")
                )
            })
    }

    /// The column name in output tables (`attributes.team` → `attr_team`).
    pub fn column(&self) -> String {
        match self {
            Dimension::Field(i) => DIMENSION_FIELDS[*i].to_owned(),
            Dimension::Attribute(k) => format!(
                "attr_{}",
                k.chars()
                    .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                    .collect::<String>()
            ),
        }
    }

    /// This dimension's value in an event.
    pub fn value<'e>(&self, e: &'e LlmEvent<'_>) -> Option<&'e str> {
        match self {
            Dimension::Field(i) => match *i {
                0 => e.app.as_deref(),
                1 => e.environment.as_deref(),
                2 => e.operation.as_deref(),
                3 => e.provider.as_deref(),
                4 => e.model.as_deref(),
                5 => e.response_model.as_deref(),
                6 => e.prompt_id.as_deref(),
                7 => e.prompt_version.as_deref(),
                8 => e.variant.as_deref(),
                9 => e.experiment.as_deref(),
                10 => Some(&e.status),
                11 => e.finish_reason.as_deref(),
                12 => e.error_type.as_deref(),
                _ => None,
            },
            Dimension::Attribute(k) => e
                .attributes
                .iter()
                .find(|(ak, _)| ak == k)
                .map(|(_, v)| &**v),
        }
    }
}

impl fmt::Display for Dimension {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dimension::Field(i) => f.write_str(DIMENSION_FIELDS[*i]),
            Dimension::Attribute(k) => write!(f, "attributes.{k}"),
        }
    }
}

/// The default series dimensions.
pub fn default_dimensions() -> Vec<Dimension> {
    ["app", "environment", "model", "prompt_version"]
        .into_iter()
        .map(|f| Dimension::parse(f).expect("a known field"))
        .collect()
}

/// A series' dimension values, in the configured order (`None`: the event has no value).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeriesKey(Arc<[Option<Box<str>>]>);

impl SeriesKey {
    pub fn new(values: &[Option<&str>]) -> SeriesKey {
        SeriesKey(values.iter().map(|v| v.map(Box::from)).collect())
    }

    pub fn values(&self) -> &[Option<Box<str>>] {
        &self.0
    }

    fn matches(&self, values: &[Option<&str>]) -> bool {
        self.0.len() == values.len() && self.0.iter().zip(values).all(|(a, b)| a.as_deref() == *b)
    }

    /// `dim=value,…` with `-` for a missing value: a stable, readable name for logs and labels.
    pub fn display(&self, dims: &[Dimension]) -> String {
        let mut s = String::new();
        for (i, (d, v)) in dims.iter().zip(self.0.iter()).enumerate() {
            if i > 0 {
                s.push(',');
            }
            s.push_str(&format!("{d}={}", v.as_deref().unwrap_or("-")));
        }
        s
    }
}

impl fmt::Debug for SeriesKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|v| v.as_deref()))
            .finish()
    }
}

/// A 128-bit fingerprint of a series' values, as two 64-bit halves: one-shot xxh3 per value,
/// each seeded with the hash so far (a streaming hasher's state is hundreds of bytes to set
/// up and move, per event: measured at a fifth of the stage).
fn hash_values(values: &[Option<&str>]) -> (u64, u64) {
    let (mut a, mut b): (u64, u64) = (0x9e37_79b9_7f4a_7c15, 0xc2b2_ae3d_27d4_eb4f);
    for v in values {
        match v {
            None => {
                a = (a ^ 0x5851_f42d_4c95_7f2d).rotate_left(29);
                b = (b ^ 0x1405_7b7e_f767_814f).rotate_left(31);
            }
            Some(s) => {
                a = xxh3_64_with_seed(s.as_bytes(), a);
                b = xxh3_64_with_seed(s.as_bytes(), b);
            }
        }
    }
    (a, b)
}

/// Keys that are already hashes need no more hashing.
#[derive(Default)]
struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// First half of the fingerprint → (second half, id).
type HashIndex = HashMap<u64, (u64, u32), BuildHasherDefault<IdentityHasher>>;

/// Interns series keys as small ids, with the live-series cap.
///
/// A series is found by its 128-bit fingerprint alone, without comparing strings (which would
/// chase a pointer per dimension into cold memory at 10 000 series): two different series
/// share a fingerprint with probability about n² / 2¹²⁹, some 10⁻³¹ at 10 000 series.
struct SeriesTable {
    index: HashIndex,
    keys: Vec<Option<(u64, SeriesKey)>>,
    free: Vec<u32>,
    live: usize,
    max_series: usize,
    other: Option<u32>,
    arity: usize,
}

impl SeriesTable {
    fn new(arity: usize, max_series: usize) -> Self {
        SeriesTable {
            index: HashIndex::default(),
            keys: Vec::new(),
            free: Vec::new(),
            live: 0,
            max_series,
            other: None,
            arity,
        }
    }

    /// The id of a series, interning it; `(id, overflowed)`.
    fn intern(&mut self, values: &[Option<&str>]) -> (u32, bool) {
        let (mut h, check) = hash_values(values);
        // Open addressing on the first half when only it collides.
        loop {
            match self.index.get(&h) {
                None => break,
                Some(&(c, id)) if c == check => {
                    debug_assert!(
                        self.keys[id as usize]
                            .as_ref()
                            .is_some_and(|(_, k)| k.matches(values))
                    );
                    return (id, false);
                }
                Some(_) => h = h.wrapping_add(1),
            }
        }
        if self.live >= self.max_series {
            return (self.other_id(), true);
        }
        (self.insert(h, check, SeriesKey::new(values)), false)
    }

    fn insert(&mut self, h: u64, check: u64, key: SeriesKey) -> u32 {
        let id = match self.free.pop() {
            Some(id) => {
                self.keys[id as usize] = Some((h, key));
                id
            }
            None => {
                self.keys.push(Some((h, key)));
                (self.keys.len() - 1) as u32
            }
        };
        self.index.insert(h, (check, id));
        self.live += 1;
        id
    }

    fn other_id(&mut self) -> u32 {
        if let Some(id) = self.other {
            return id;
        }
        // The overflow series does not count against the cap and is never looked up by value.
        let key = SeriesKey::new(&vec![Some(OTHER); self.arity]);
        let id = match self.free.pop() {
            Some(id) => {
                self.keys[id as usize] = Some((0, key));
                id
            }
            None => {
                self.keys.push(Some((0, key)));
                (self.keys.len() - 1) as u32
            }
        };
        self.other = Some(id);
        id
    }

    fn key(&self, id: u32) -> &SeriesKey {
        &self.keys[id as usize].as_ref().expect("live id").1
    }

    /// Drops every series not in `keep`.
    fn retain(&mut self, keep: &[bool]) {
        for id in 0..self.keys.len() {
            if keep.get(id).copied().unwrap_or(false) {
                continue;
            }
            if Some(id as u32) == self.other {
                self.other = None;
                self.keys[id] = None;
                self.free.push(id as u32);
                continue;
            }
            if let Some((h, _)) = self.keys[id].take() {
                self.index.remove(&h);
                self.free.push(id as u32);
                self.live -= 1;
            }
        }
    }
}

/// Window settings.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowConfig {
    pub dimensions: Vec<Dimension>,
    /// Tumbling window length (default 1 min).
    pub size_ms: i64,
    /// How far behind the newest event a window stays open (default 2 min).
    pub lateness_ms: i64,
    /// Roll-up length, a multiple of `size_ms` (default 1 h).
    pub rollup_ms: i64,
    /// Live series cap (default 10 000).
    pub max_series: usize,
    /// Event times further ahead of the wall clock than this do not move the watermark
    /// (default 5 min).
    pub max_future_ms: i64,
}

impl Default for WindowConfig {
    fn default() -> Self {
        WindowConfig {
            dimensions: default_dimensions(),
            size_ms: 60_000,
            lateness_ms: 120_000,
            rollup_ms: 3_600_000,
            max_series: 10_000,
            max_future_ms: 300_000,
        }
    }
}

/// A window that closed, with the state of each series that had events in it.
pub struct Closed<S> {
    pub start_ms: i64,
    pub end_ms: i64,
    pub series: Vec<(SeriesKey, S)>,
}

/// Where an event goes.
pub enum Slot<'a, S> {
    Open(&'a mut S),
    /// Its window already closed.
    Late,
}

#[derive(Debug, Clone, Copy)]
struct Lane {
    max_event_ms: i64,
    seen: bool,
    /// Wall clock of the last advance that found the lane had events (event-time mode: 0).
    active_at: i64,
}

impl Default for Lane {
    fn default() -> Self {
        Lane {
            max_event_ms: i64::MIN,
            seen: false,
            active_at: i64::MIN,
        }
    }
}

/// Per-series state kept in a window.
pub trait WindowState: Default {
    /// Called once every active partition's events have moved past the window's end: from
    /// now on only stragglers land in it, so the state may pack itself small.
    fn settle(&mut self) {}
}

impl WindowState for u64 {}

/// Open windows of per-series state `S`, keyed by window start.
pub struct Windows<S> {
    config: WindowConfig,
    table: SeriesTable,
    open: BTreeMap<i64, Vec<Option<Box<S>>>>,
    /// Every window ending at or before this is closed.
    closed_through: i64,
    /// Every window ending at or before this has been settled.
    settled_through: i64,
    lanes: Vec<Lane>,
    /// Wall clock at the last [`Windows::advance`] (`None` on event time alone).
    now_ms: Option<i64>,
    events_since_advance: u64,
    idle_since_ms: Option<i64>,
    late: u64,
    overflowed: u64,
}

impl<S: WindowState> Windows<S> {
    /// `closed_through`: the end of the last window closed by an earlier run (`i64::MIN`
    /// for none).
    pub fn new(config: WindowConfig, closed_through: i64) -> Self {
        let table = SeriesTable::new(config.dimensions.len(), config.max_series);
        Windows {
            config,
            table,
            open: BTreeMap::new(),
            closed_through,
            settled_through: i64::MIN,
            lanes: Vec::new(),
            now_ms: None,
            events_since_advance: 0,
            idle_since_ms: None,
            late: 0,
            overflowed: 0,
        }
    }

    pub fn config(&self) -> &WindowConfig {
        &self.config
    }

    /// Start of the window holding `ts`.
    pub fn window_start(&self, ts: i64) -> i64 {
        // `ts - ts mod size`, saturating for the sentinel times near i64::MIN.
        ts.checked_sub(ts.rem_euclid(self.config.size_ms))
            .unwrap_or(i64::MIN)
    }

    /// The state of the event's series in the event's window; `lane` is the event's source
    /// partition as a small dense index (0 when there is one).
    pub fn slot(&mut self, e: &LlmEvent<'_>, lane: usize) -> Slot<'_, S> {
        let mut buf: [Option<&str>; 8] = [None; 8];
        let n = self.config.dimensions.len();
        if n <= buf.len() {
            for (slot, d) in buf.iter_mut().zip(&self.config.dimensions) {
                *slot = d.value(e);
            }
            self.slot_for(e.timestamp_ms, &buf[..n], lane)
        } else {
            let values: Vec<Option<&str>> =
                self.config.dimensions.iter().map(|d| d.value(e)).collect();
            self.slot_for(e.timestamp_ms, &values, lane)
        }
    }

    /// The state of the series with these dimension values in the window holding `ts`.
    pub fn slot_for(&mut self, ts: i64, values: &[Option<&str>], lane: usize) -> Slot<'_, S> {
        let start = self.window_start(ts);
        if start.saturating_add(self.config.size_ms) <= self.closed_through {
            self.late += 1;
            return Slot::Late;
        }
        self.events_since_advance += 1;
        let capped = match self.now_ms {
            Some(now) => ts.min(now.saturating_add(self.config.max_future_ms)),
            None => ts,
        };
        if self.lanes.len() <= lane {
            self.lanes.resize(lane + 1, Lane::default());
        }
        let l = &mut self.lanes[lane];
        l.max_event_ms = l.max_event_ms.max(capped);
        l.seen = true;
        let (id, overflowed) = self.table.intern(values);
        if overflowed {
            self.overflowed += 1;
        }
        let window = self.open.entry(start).or_default();
        let i = id as usize;
        if window.len() <= i {
            window.resize_with(i + 1, || None);
        }
        Slot::Open(window[i].get_or_insert_with(Default::default))
    }

    /// Announces a lane (a partition just assigned) before its first event: until it delivers
    /// one, or stays silent for `lateness`, it holds the watermark where it is, so partitions
    /// read first cannot make the others' events late.
    pub fn register_lane(&mut self, lane: usize, now_ms: i64) {
        if self.lanes.len() <= lane {
            self.lanes.resize(lane + 1, Lane::default());
        }
        let l = &mut self.lanes[lane];
        l.active_at = l.active_at.max(now_ms);
    }

    /// Event time every active partition has reached (the watermark before lateness).
    fn event_frontier(&self) -> i64 {
        self.watermark().saturating_add(self.config.lateness_ms)
    }

    /// The watermark: windows ending at or before it close.
    pub fn watermark(&self) -> i64 {
        let lateness = self.config.lateness_ms;
        let active = |l: &&Lane| match self.now_ms {
            Some(now) => l.seen || now.saturating_sub(l.active_at) < lateness,
            None => l.max_event_ms > i64::MIN,
        };
        let mut w = self
            .lanes
            .iter()
            .filter(active)
            .map(|l| l.max_event_ms)
            .min()
            .or_else(|| self.lanes.iter().map(|l| l.max_event_ms).max())
            .unwrap_or(i64::MIN);
        if let (Some(now), Some(idle)) = (self.now_ms, self.idle_since_ms)
            && now.saturating_sub(idle) >= self.config.lateness_ms
        {
            w = w.max(now);
        }
        w.saturating_sub(self.config.lateness_ms)
    }

    /// Moves time forward and returns the windows that closed, oldest first.
    /// `now_ms`: the wall clock, or `None` to go by event time alone (backfills, replays).
    pub fn advance(&mut self, now_ms: Option<i64>) -> Vec<Closed<S>> {
        self.now_ms = now_ms;
        if self.events_since_advance > 0 {
            self.idle_since_ms = None;
        } else if self.idle_since_ms.is_none() {
            self.idle_since_ms = now_ms;
        }
        self.events_since_advance = 0;
        let wm = self.watermark();
        let frontier = self.window_start(self.event_frontier());
        for l in &mut self.lanes {
            if l.seen {
                l.active_at = now_ms.unwrap_or(0);
                l.seen = false;
            }
        }
        if wm == i64::MIN {
            return Vec::new();
        }
        let closed = self.close_through(self.window_start(wm));
        if frontier > self.settled_through {
            let size = self.config.size_ms;
            for (_, states) in self
                .open
                .range_mut(self.settled_through.saturating_sub(size)..)
                .take_while(|(start, _)| start.saturating_add(size) <= frontier)
            {
                for s in states.iter_mut().flatten() {
                    s.settle();
                }
            }
            self.settled_through = frontier;
        }
        closed
    }

    /// Closes every open window (end of a finite input).
    pub fn close_all(&mut self) -> Vec<Closed<S>> {
        let end = match self.open.keys().next_back() {
            Some(start) => start.saturating_add(self.config.size_ms),
            None => return Vec::new(),
        };
        self.close_through(end)
    }

    /// Closes the windows that end at or before `through` (a window boundary).
    fn close_through(&mut self, through: i64) -> Vec<Closed<S>> {
        if through <= self.closed_through {
            return Vec::new();
        }
        self.closed_through = through;
        let size = self.config.size_ms;
        let mut closed = Vec::new();
        while let Some((&start, _)) = self.open.first_key_value() {
            if start.saturating_add(size) > through {
                break;
            }
            let (_, states) = self.open.pop_first().expect("checked above");
            let series = states
                .into_iter()
                .enumerate()
                .filter_map(|(id, s)| s.map(|s| (self.table.key(id as u32).clone(), *s)))
                .collect();
            closed.push(Closed {
                start_ms: start,
                end_ms: start.saturating_add(size),
                series,
            });
        }
        if !closed.is_empty() {
            let mut keep = vec![false; self.table.keys.len()];
            for states in self.open.values() {
                for (id, s) in states.iter().enumerate() {
                    if s.is_some() {
                        keep[id] = true;
                    }
                }
            }
            self.table.retain(&keep);
        }
        closed
    }

    /// End of the last closed window.
    pub fn closed_through(&self) -> i64 {
        self.closed_through
    }

    /// Events whose window had already closed.
    pub fn late_events(&self) -> u64 {
        self.late
    }

    /// Events folded into `__other__` because the live-series cap was reached.
    pub fn overflowed_events(&self) -> u64 {
        self.overflowed
    }

    /// Series with state in an open window (not counting `__other__`).
    pub fn live_series(&self) -> usize {
        self.table.live
    }

    pub fn open_windows(&self) -> usize {
        self.open.len()
    }

    /// Visits every open (series, state), for memory accounting.
    pub fn for_each_open(&self, mut f: impl FnMut(&S)) {
        for states in self.open.values() {
            for s in states.iter().flatten() {
                f(s);
            }
        }
    }
}

/// A coarser window built by merging closed finer ones. `C` is the closed (compact) form.
pub struct Rollup<C> {
    size_ms: i64,
    current: Option<(i64, HashMap<SeriesKey, C>)>,
}

impl<C> Rollup<C> {
    pub fn new(size_ms: i64) -> Self {
        Rollup {
            size_ms,
            current: None,
        }
    }

    pub fn window_start(&self, ts: i64) -> i64 {
        ts.checked_sub(ts.rem_euclid(self.size_ms))
            .unwrap_or(i64::MIN)
    }

    /// Adds a finer window that closed (finer windows close in order); returns the roll-up
    /// it completed, if any.
    pub fn add(
        &mut self,
        start_ms: i64,
        series: impl IntoIterator<Item = (SeriesKey, C)>,
        merge: impl Fn(&mut C, C),
    ) -> Option<Closed<C>> {
        let start = self.window_start(start_ms);
        let done = self.close_before(start);
        let (_, map) = self.current.get_or_insert_with(|| (start, HashMap::new()));
        for (k, c) in series {
            match map.get_mut(&k) {
                Some(acc) => merge(acc, c),
                None => {
                    map.insert(k, c);
                }
            }
        }
        done
    }

    /// Closes the roll-up if every finer window in it has closed (`closed_through` at or past
    /// its end) or a later one has started.
    pub fn close_before(&mut self, through: i64) -> Option<Closed<C>> {
        let (start, _) = self.current.as_ref()?;
        if start.saturating_add(self.size_ms) > through {
            return None;
        }
        let (start, map) = self.current.take().expect("checked above");
        let mut series: Vec<_> = map.into_iter().collect();
        series.sort_by(|a, b| a.0.cmp(&b.0));
        Some(Closed {
            start_ms: start,
            end_ms: start.saturating_add(self.size_ms),
            series,
        })
    }

    /// The open roll-up's start and series count.
    pub fn current(&self) -> Option<(i64, usize)> {
        self.current.as_ref().map(|(s, m)| (*s, m.len()))
    }
}

#[cfg(test)]
mod tests;
