//! From firing and resolved alerts to notifications, with Alertmanager's discipline: routes,
//! groups (`group_by`, `group_wait`, `group_interval`, `repeat_interval`), deduplication
//! against a notification log, silences, inhibition, and resolve notifications.
//!
//! Pure like the engine: `now` comes in as an argument (milliseconds of the dispatch clock),
//! notifications come out, and the driver reports back how their delivery ended.
//!
//! A group notifies when its first `group_wait` has passed, then at most once per
//! `group_interval`, and only when something changed since the last notification that
//! *succeeded* (an alert started firing, or resolved), or when `repeat_interval` has passed
//! with alerts still firing. While one notification of a group is being delivered (with
//! retries), the group sends no other; if delivery fails for good, the next flush tries again.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::engine::{Alert, Labels, hex_u64};
use super::rule::{Inhibit, Matcher, matches_all};

/// Where alerts go, and how they are grouped (`[[alerting.routes]]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub matchers: Vec<Matcher>,
    pub receivers: Vec<String>,
    pub group_by: Vec<String>,
    pub group_wait_ms: i64,
    pub group_interval_ms: i64,
    pub repeat_interval_ms: i64,
    /// Go on matching the next routes after this one.
    pub continue_matching: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Firing,
    Resolved,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Firing => "firing",
            Status::Resolved => "resolved",
        }
    }
}

/// An alert as notifications show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notified {
    #[serde(with = "hex_u64")]
    pub fingerprint: u64,
    pub rule: String,
    pub severity: String,
    pub labels: Labels,
    pub annotations: BTreeMap<String, String>,
    pub status: Status,
    /// Window end at which it started firing (event time).
    pub starts_at: i64,
    pub ends_at: Option<i64>,
    pub value: f64,
    pub baseline: Option<f64>,
    pub threshold: f64,
}

impl Notified {
    fn from_alert(a: &Alert) -> Notified {
        Notified {
            fingerprint: a.fingerprint,
            rule: a.rule.clone(),
            severity: a.severity.clone(),
            labels: a.labels.clone(),
            annotations: a.annotations.clone(),
            status: Status::Firing,
            starts_at: a.fired_at.unwrap_or(a.active_at),
            ends_at: None,
            value: a.value,
            baseline: a.baseline,
            threshold: a.threshold,
        }
    }
}

/// One message to one receiver.
#[derive(Debug, Clone, PartialEq)]
pub struct Notification {
    pub id: u64,
    pub receiver: String,
    pub group_key: String,
    pub group_labels: Labels,
    /// `firing` when any alert in it fires.
    pub status: Status,
    pub alerts: Vec<Notified>,
    /// Dispatch-clock time it was cut.
    pub at: i64,
}

/// What was last delivered for a group.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Sent {
    pub at: i64,
    #[serde(with = "hex_set")]
    pub firing: BTreeSet<u64>,
    #[serde(with = "hex_set")]
    pub resolved: BTreeSet<u64>,
}

mod hex_set {
    use std::collections::BTreeSet;

    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &BTreeSet<u64>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|x| format!("{x:016x}")))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeSet<u64>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|s| u64::from_str_radix(s, 16).map_err(serde::de::Error::custom))
            .collect()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Group {
    pub receiver: String,
    pub key: String,
    pub route: usize,
    pub labels: Labels,
    pub alerts: BTreeMap<String, Notified>,
    pub next_flush: i64,
    /// The last notification that was delivered.
    pub last: Option<Sent>,
    /// The notification being delivered (not persisted: after a restart it is cut again).
    #[serde(skip)]
    pub in_flight: Option<(u64, Sent)>,
}

/// `telltale silence add`: mutes matching alerts from `starts_at` to `ends_at`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Silence {
    pub id: String,
    pub matchers: Vec<String>,
    pub starts_at: i64,
    pub ends_at: i64,
    pub created_by: String,
    pub comment: String,
}

impl Silence {
    pub fn is_active(&self, now: i64) -> bool {
        self.starts_at <= now && now < self.ends_at
    }
}

struct ActiveSilence {
    ends_at: i64,
    starts_at: i64,
    matchers: Vec<Matcher>,
}

pub struct Dispatcher {
    routes: Vec<Route>,
    default_route: Route,
    inhibits: Vec<Inhibit>,
    silences: Vec<ActiveSilence>,
    send_resolved: bool,
    groups: BTreeMap<(String, String), Group>,
    next_id: u64,
}

/// Muting decisions of one flush, for the alerts table and the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Muted {
    No,
    Silenced,
    Inhibited,
}

impl Dispatcher {
    pub fn new(
        routes: Vec<Route>,
        default_route: Route,
        inhibits: Vec<Inhibit>,
        send_resolved: bool,
    ) -> Dispatcher {
        Dispatcher {
            routes,
            default_route,
            inhibits,
            silences: Vec::new(),
            send_resolved,
            groups: BTreeMap::new(),
            next_id: 1,
        }
    }

    /// Replaces the silences (they are re-read when their file changes).
    pub fn set_silences(&mut self, silences: &[Silence]) {
        self.silences = silences
            .iter()
            .filter_map(|s| {
                let ms: Result<Vec<Matcher>, String> =
                    s.matchers.iter().map(|m| Matcher::parse(m)).collect();
                ms.ok().map(|matchers| ActiveSilence {
                    starts_at: s.starts_at,
                    ends_at: s.ends_at,
                    matchers,
                })
            })
            .collect();
    }

    pub fn groups(&self) -> impl Iterator<Item = &Group> {
        self.groups.values()
    }

    pub fn restore(&mut self, groups: Vec<Group>) {
        for g in groups {
            self.groups.insert((g.receiver.clone(), g.key.clone()), g);
        }
    }

    /// The indices of the routes an alert takes (`usize::MAX`: the default route).
    fn routes_for(&self, labels: &Labels) -> Vec<usize> {
        let mut out = Vec::new();
        for (i, r) in self.routes.iter().enumerate() {
            if matches_all(&r.matchers, |k| labels.get(k).map(String::as_str)) {
                out.push(i);
                if !r.continue_matching {
                    return out;
                }
            }
        }
        if out.is_empty() {
            out.push(usize::MAX);
        }
        out
    }

    /// Puts firing alerts (new or still firing, with current values) into their groups.
    pub fn firing(&mut self, alerts: &[Alert], now: i64) {
        for a in alerts {
            self.put(Notified::from_alert(a), now);
        }
    }

    /// Marks alerts resolved (`ends_at`: the window end that cleared them).
    pub fn resolved(&mut self, alerts: &[(Alert, i64)], now: i64) {
        for (a, ends_at) in alerts {
            let mut n = Notified::from_alert(a);
            n.status = Status::Resolved;
            n.ends_at = Some(*ends_at);
            self.put(n, now);
        }
    }

    fn put(&mut self, n: Notified, now: i64) {
        let targets = self.routes_for(&n.labels);
        let Dispatcher {
            routes,
            default_route,
            groups,
            ..
        } = self;
        for ri in targets {
            let route = routes.get(ri).unwrap_or(default_route);
            let glabels: Labels = route
                .group_by
                .iter()
                .filter_map(|k| n.labels.get(k).map(|v| (k.clone(), v.clone())))
                .collect();
            let route_name = if ri == usize::MAX {
                "default".to_owned()
            } else {
                ri.to_string()
            };
            let gkey = format!(
                "{{}}/{route_name}:{{{}}}",
                glabels
                    .iter()
                    .map(|(k, v)| format!("{k}={v:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            for recv in &route.receivers {
                let g = groups
                    .entry((recv.clone(), gkey.clone()))
                    .or_insert_with(|| Group {
                        receiver: recv.clone(),
                        key: gkey.clone(),
                        route: ri,
                        labels: glabels.clone(),
                        alerts: BTreeMap::new(),
                        next_flush: now + route.group_wait_ms,
                        last: None,
                        in_flight: None,
                    });
                let fp = format!("{:016x}", n.fingerprint);
                if n.status == Status::Resolved && !g.alerts.contains_key(&fp) {
                    // Resolved before it ever reached this group: nothing to say.
                    continue;
                }
                g.alerts.insert(fp, n.clone());
            }
        }
    }

    fn route(&self, i: usize) -> &Route {
        self.routes.get(i).unwrap_or(&self.default_route)
    }

    /// Why an alert is muted right now.
    pub fn muted(&self, labels: &Labels, now: i64) -> Muted {
        let get = |k: &str| labels.get(k).map(String::as_str);
        if self
            .silences
            .iter()
            .any(|s| s.starts_at <= now && now < s.ends_at && matches_all(&s.matchers, get))
        {
            return Muted::Silenced;
        }
        for inh in &self.inhibits {
            if !matches_all(&inh.target, get) || matches_all(&inh.source, get) {
                continue;
            }
            let by = self
                .groups
                .values()
                .flat_map(|g| g.alerts.values())
                .any(|s| {
                    s.status == Status::Firing
                        && matches_all(&inh.source, |k| s.labels.get(k).map(String::as_str))
                        && inh.equal.iter().all(|k| s.labels.get(k) == labels.get(k))
                });
            if by {
                return Muted::Inhibited;
            }
        }
        Muted::No
    }

    /// Cuts the notifications that are due.
    pub fn flush(&mut self, now: i64) -> Vec<Notification> {
        let due: Vec<(String, String)> = self
            .groups
            .iter()
            .filter(|(_, g)| g.next_flush <= now && g.in_flight.is_none())
            .map(|(k, _)| k.clone())
            .collect();
        let mut out = Vec::new();
        for k in due {
            let visible: Vec<Notified> = {
                let g = &self.groups[&k];
                g.alerts
                    .values()
                    .filter(|a| self.muted(&a.labels, now) == Muted::No)
                    .cloned()
                    .collect()
            };
            let route = self.route(self.groups[&k].route).clone();
            let send_resolved = self.send_resolved;
            let id = self.next_id;
            let g = self.groups.get_mut(&k).expect("due group exists");
            g.next_flush = now + route.group_interval_ms;
            let announced = g
                .last
                .as_ref()
                .map(|l| l.firing.clone())
                .unwrap_or_default();
            let firing: BTreeSet<u64> = visible
                .iter()
                .filter(|a| a.status == Status::Firing)
                .map(|a| a.fingerprint)
                .collect();
            // A resolution is news only for an alert whose firing was notified.
            let resolved: BTreeSet<u64> = visible
                .iter()
                .filter(|a| a.status == Status::Resolved && announced.contains(&a.fingerprint))
                .map(|a| a.fingerprint)
                .collect();
            // Alertmanager's needsUpdate: a new firing alert, everything resolved, a new
            // resolution (when resolutions are sent), or the repeat interval.
            let needed = match &g.last {
                None => !firing.is_empty(),
                Some(last) => {
                    !firing.is_subset(&last.firing)
                        || (firing.is_empty() && !last.firing.is_empty())
                        || (send_resolved && !resolved.is_subset(&last.resolved))
                        || (!firing.is_empty() && now - last.at >= route.repeat_interval_ms)
                }
            };
            if !needed {
                g.alerts.retain(|_, a| a.status == Status::Firing);
                continue;
            }
            let sent = Sent {
                at: now,
                firing,
                resolved,
            };
            let mut alerts: Vec<Notified> = visible
                .into_iter()
                .filter(|a| {
                    sent.firing.contains(&a.fingerprint)
                        || (send_resolved && sent.resolved.contains(&a.fingerprint))
                })
                .collect();
            alerts.sort_by(|a, b| {
                (a.status != Status::Firing, &a.labels)
                    .cmp(&(b.status != Status::Firing, &b.labels))
            });
            if alerts.is_empty() {
                // Everything resolved, and this receiver does not take resolutions.
                drop_resolved(g, &sent.resolved);
                g.alerts.retain(|_, a| a.status == Status::Firing);
                g.last = Some(sent);
                continue;
            }
            self.next_id += 1;
            out.push(Notification {
                id,
                receiver: g.receiver.clone(),
                group_key: g.key.clone(),
                group_labels: g.labels.clone(),
                status: if sent.firing.is_empty() {
                    Status::Resolved
                } else {
                    Status::Firing
                },
                alerts,
                at: now,
            });
            g.in_flight = Some((id, sent));
        }
        self.groups
            .retain(|_, g| !g.alerts.is_empty() || g.in_flight.is_some());
        out
    }

    /// Records how a notification's delivery ended.
    pub fn delivered(&mut self, receiver: &str, group_key: &str, id: u64, ok: bool) {
        let key = (receiver.to_owned(), group_key.to_owned());
        let Some(g) = self.groups.get_mut(&key) else {
            return;
        };
        match g.in_flight.take() {
            Some((fid, sent)) if fid == id => {
                if ok {
                    drop_resolved(g, &sent.resolved);
                    g.last = Some(sent);
                }
            }
            other => g.in_flight = other,
        }
        if g.alerts.is_empty() && g.in_flight.is_none() {
            self.groups.remove(&key);
        }
    }

    /// The earliest time a group is due (for the driver's sleep).
    pub fn next_due(&self) -> Option<i64> {
        self.groups
            .values()
            .filter(|g| g.in_flight.is_none())
            .map(|g| g.next_flush)
            .min()
    }
}

/// Resolved alerts leave their group once their resolution was delivered.
fn drop_resolved(g: &mut Group, delivered: &BTreeSet<u64>) {
    g.alerts
        .retain(|_, a| !(a.status == Status::Resolved && delivered.contains(&a.fingerprint)));
}
