//! PII and secret detection in free text: e-mail addresses, phone numbers, payment card
//! numbers (Luhn-checked, known issuer prefixes), IBANs (ISO 13616 mod-97 check) and API-key-
//! like secrets (provider prefixes, private-key blocks).
//!
//! One [`RegexSet`] pass tells which kinds may be present; only those kinds' patterns run
//! again to find and validate the spans, so a text without PII costs one scan. Every pattern
//! uses ASCII word boundaries, which keeps the regex engine on its DFA for any text.
//!
//! Spans are byte ranges, for redaction (`<EMAIL_1>`) by the harvest stage.

use std::sync::LazyLock;

use regex::{Regex, RegexSet};

/// What a span is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PiiKind {
    Email,
    Phone,
    CreditCard,
    Iban,
    Secret,
}

impl PiiKind {
    pub const ALL: [PiiKind; 5] = [
        PiiKind::Email,
        PiiKind::Phone,
        PiiKind::CreditCard,
        PiiKind::Iban,
        PiiKind::Secret,
    ];

    pub fn name(self) -> &'static str {
        match self {
            PiiKind::Email => "email",
            PiiKind::Phone => "phone",
            PiiKind::CreditCard => "credit_card",
            PiiKind::Iban => "iban",
            PiiKind::Secret => "secret",
        }
    }

    pub fn parse(s: &str) -> Option<PiiKind> {
        PiiKind::ALL.into_iter().find(|k| k.name() == s)
    }
}

/// One detected span.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PiiMatch {
    pub kind: PiiKind,
    pub start: usize,
    pub end: usize,
}

const PATTERNS: [&str; 5] = [
    // E-mail: local part, @, a domain with a dot and a 2+ letter top-level label.
    r"(?-u:\b)[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,24}(?-u:\b)",
    // Phone: North American 3-3-4 with separators, or international with a leading +.
    r"(?:\(\d{3}\)\s?|(?-u:\b)\d{3}[\-.\s])\d{3}[\-.\s]\d{4}(?-u:\b)|\+\d{1,3}[\s\-]?(?:\(\d{1,4}\)[\s\-]?)?\d{1,4}(?:[\s\-]?\d{2,4}){2,4}(?-u:\b)",
    // Card numbers: 13–19 digits, optionally grouped by spaces or dashes.
    r"(?-u:\b)\d(?:[ \-]?\d){12,18}(?-u:\b)",
    // IBAN: country, check digits, 11–30 alphanumerics, optionally grouped by fours.
    r"(?-u:\b)[A-Z]{2}\d{2}(?:[ ]?[A-Z0-9]{4}){2,7}(?:[ ]?[A-Z0-9]{1,3})?(?-u:\b)",
    // Secrets: OpenAI, Anthropic, AWS access keys, GitHub, Slack, Google, Stripe, GitLab
    // tokens, and PEM private keys.
    r"(?-u:\b)(?:sk-(?:proj-|ant-)?[A-Za-z0-9_\-]{20,}|AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{36,}|xox[abprs]-[A-Za-z0-9\-]{10,}|AIza[0-9A-Za-z_\-]{35}|[sr]k_live_[0-9A-Za-z]{20,}|glpat-[0-9A-Za-z_\-]{20,})|-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----",
];

struct Detector {
    set: RegexSet,
    each: Vec<Regex>,
}

static DETECTOR: LazyLock<Detector> = LazyLock::new(|| Detector {
    set: RegexSet::new(PATTERNS).expect("PII patterns compile"),
    each: PATTERNS
        .iter()
        .map(|p| Regex::new(p).expect("PII pattern compiles"))
        .collect(),
});

/// Every validated span of the `kinds` in `text`, in text order.
pub fn find(text: &str, kinds: &[PiiKind]) -> Vec<PiiMatch> {
    let d = &*DETECTOR;
    let mut out = Vec::new();
    for i in d.set.matches(text).iter() {
        let kind = PiiKind::ALL[i];
        if !kinds.contains(&kind) {
            continue;
        }
        for m in d.each[i].find_iter(text) {
            if kind == PiiKind::CreditCard {
                // The digit run may have swallowed a neighbouring number ("… 4111…1111 2024"):
                // look for a valid card among its separator-delimited groups.
                if let Some((s, e)) = card_within(m.as_str()) {
                    out.push(PiiMatch {
                        kind,
                        start: m.start() + s,
                        end: m.start() + e,
                    });
                }
            } else if valid(kind, m.as_str()) {
                out.push(PiiMatch {
                    kind,
                    start: m.start(),
                    end: m.end(),
                });
            }
        }
    }
    out.sort_by_key(|m| (m.start, m.kind));
    out
}

/// Whether any of `kinds` is present (stops at the first validated span).
pub fn contains(text: &str, kinds: &[PiiKind]) -> bool {
    let d = &*DETECTOR;
    d.set.matches(text).iter().any(|i| {
        let kind = PiiKind::ALL[i];
        kinds.contains(&kind)
            && d.each[i].find_iter(text).any(|m| match kind {
                PiiKind::CreditCard => card_within(m.as_str()).is_some(),
                _ => valid(kind, m.as_str()),
            })
    })
}

fn valid(kind: PiiKind, s: &str) -> bool {
    match kind {
        PiiKind::Email => !s.starts_with('.') && !s.contains(".."),
        PiiKind::Phone => phone_ok(s),
        PiiKind::CreditCard => card_within(s).is_some(),
        PiiKind::Iban => iban_ok(s),
        PiiKind::Secret => true,
    }
}

fn digits(s: &str) -> Vec<u8> {
    s.bytes()
        .filter(u8::is_ascii_digit)
        .map(|b| b - b'0')
        .collect()
}

fn phone_ok(s: &str) -> bool {
    let d = digits(s);
    if !(10..=15).contains(&d.len()) {
        return false;
    }
    // Dotted groups like 192.168.100.1000 or version numbers are not phone numbers unless the
    // number is a plain 3.3.4 one.
    !(s.contains('.') && s.starts_with('+'))
}

/// The byte range of a valid card number in a run of digit groups: the whole run, else the
/// widest run of whole groups that is one.
fn card_within(s: &str) -> Option<(usize, usize)> {
    if card_ok(s) {
        return Some((0, s.len()));
    }
    let mut groups = Vec::new();
    let mut start = None;
    for (i, b) in s.bytes().enumerate() {
        match (b.is_ascii_digit(), start) {
            (true, None) => start = Some(i),
            (false, Some(st)) => {
                groups.push((st, i));
                start = None;
            }
            _ => {}
        }
    }
    if let Some(st) = start {
        groups.push((st, s.len()));
    }
    let mut best: Option<(usize, usize)> = None;
    for i in 0..groups.len() {
        for j in (i..groups.len()).rev() {
            let (a, b) = (groups[i].0, groups[j].1);
            if (i, j) != (0, groups.len() - 1)
                && best.is_none_or(|(x, y)| b - a > y - x)
                && card_ok(&s[a..b])
            {
                best = Some((a, b));
            }
        }
    }
    best
}

/// Luhn checksum and a known issuer prefix (Visa, Mastercard, Amex, Discover, JCB, Diners).
fn card_ok(s: &str) -> bool {
    let d = digits(s);
    if !(13..=19).contains(&d.len()) {
        return false;
    }
    // Grouping, when present, is how cards are printed: one separator kind, a first group of
    // four, groups of 3–6 (4-4-4-4, 4-6-5, 4-6-4, 4-4-4-4-3) — not a list of small numbers.
    if s.contains(' ') && s.contains('-') {
        return false;
    }
    let groups: Vec<usize> = s.split([' ', '-']).map(str::len).collect();
    if groups.len() > 1 && (groups[0] != 4 || groups.iter().any(|g| !(3..=6).contains(g))) {
        return false;
    }
    let prefix = |n: usize| d[..n].iter().fold(0u32, |a, &x| a * 10 + u32::from(x));
    let issuer = match d[0] {
        4 => true,
        5 => (51..=55).contains(&prefix(2)),
        2 => (2221..=2720).contains(&prefix(4)),
        3 => matches!(prefix(2), 34 | 37 | 35 | 36 | 38 | 30),
        6 => prefix(4) == 6011 || prefix(2) == 65,
        _ => false,
    };
    issuer && luhn(&d)
}

pub fn luhn(d: &[u8]) -> bool {
    let sum: u32 = d
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &x)| {
            let x = u32::from(x);
            if i % 2 == 1 {
                let y = x * 2;
                if y > 9 { y - 9 } else { y }
            } else {
                x
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// ISO 13616: 15–34 characters; moving the first four to the end and reading letters as
/// 10–35 gives a number ≡ 1 (mod 97).
pub fn iban_ok(s: &str) -> bool {
    let compact: Vec<u8> = s.bytes().filter(|b| *b != b' ').collect();
    if !(15..=34).contains(&compact.len()) {
        return false;
    }
    let (head, tail) = compact.split_at(4);
    let mut rem: u32 = 0;
    for &b in tail.iter().chain(head) {
        let v = match b {
            b'0'..=b'9' => u32::from(b - b'0'),
            b'A'..=b'Z' => u32::from(b - b'A') + 10,
            _ => return false,
        };
        rem = if v >= 10 {
            (rem * 100 + v) % 97
        } else {
            (rem * 10 + v) % 97
        };
    }
    rem == 1
}

/// `text` with every span replaced by a numbered placeholder per kind and distinct value
/// (`<EMAIL_1>`, `<EMAIL_2>`; the same address twice gets the same number).
pub fn redact(text: &str, kinds: &[PiiKind]) -> String {
    Redactor::new(kinds).redact(text)
}

/// [`redact`] over several texts of one record (input, output, explanation…): a value keeps
/// its placeholder across them, so the redacted record still reads consistently.
#[derive(Debug, Clone)]
pub struct Redactor<'k> {
    kinds: &'k [PiiKind],
    seen: Vec<(PiiKind, String, usize)>,
}

impl<'k> Redactor<'k> {
    pub fn new(kinds: &'k [PiiKind]) -> Redactor<'k> {
        Redactor {
            kinds,
            seen: Vec::new(),
        }
    }

    /// How many distinct values were replaced so far.
    pub fn replaced(&self) -> usize {
        self.seen.len()
    }

    pub fn redact(&mut self, text: &str) -> String {
        let spans = find(text, self.kinds);
        if spans.is_empty() {
            return text.to_owned();
        }
        let mut out = String::with_capacity(text.len());
        let mut at = 0;
        for m in spans {
            if m.start < at {
                continue; // overlaps a span already replaced
            }
            out.push_str(&text[at..m.start]);
            let value = &text[m.start..m.end];
            let n = match self
                .seen
                .iter()
                .find(|(k, v, _)| *k == m.kind && v == value)
            {
                Some((_, _, n)) => *n,
                None => {
                    let n = self.seen.iter().filter(|(k, _, _)| *k == m.kind).count() + 1;
                    self.seen.push((m.kind, value.to_owned(), n));
                    n
                }
            };
            out.push_str(&format!("<{}_{n}>", m.kind.name().to_ascii_uppercase()));
            at = m.end;
        }
        out.push_str(&text[at..]);
        out
    }
}
