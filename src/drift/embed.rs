//! Text → vector. One trait for every embedder; [`HashEmbedder`] is the dependency-free one
//! that always works (the pipeline and `telltale demo` never depend on model files).

use xxhash_rust::xxh3::xxh3_64_with_seed;

#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error("embedder {embedder}: {message}")]
    Failed { embedder: String, message: String },
}

/// Turns texts into unit-length vectors of a fixed dimension. Implementations are CPU-bound:
/// call them from a blocking thread, in batches.
pub trait Embedder: Send + Sync {
    /// Names the embedder and its model in the `drift` table (`hash-256`, `fastembed/…`).
    fn id(&self) -> &str;
    fn dim(&self) -> usize;
    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError>;
}

/// Hashed bag of words and word pairs ("the hashing trick", Weinberger et al. 2009): each
/// lower-cased word and each pair of neighbouring words adds ±1 to one of `dim` coordinates,
/// chosen and signed by a hash; counts are damped (1 + ln n) and the vector L2-normalized.
/// It knows no synonyms, but a change of topic or style changes the words, which is what
/// drift on LLM traffic mostly is; a sentence model (`fastembed`) sees more.
#[derive(Debug, Clone)]
pub struct HashEmbedder {
    dim: usize,
    id: String,
}

impl HashEmbedder {
    pub fn new(dim: usize) -> HashEmbedder {
        let dim = dim.max(8);
        HashEmbedder {
            dim,
            id: format!("hash-{dim}"),
        }
    }

    fn one(&self, text: &str) -> Vec<f32> {
        let mut counts = vec![0f32; self.dim];
        let mut prev: Option<&str> = None;
        let lower = text.to_lowercase();
        let mut add = |bytes: &[u8], seed: u64| {
            let h = xxh3_64_with_seed(bytes, seed);
            let i = (h % self.dim as u64) as usize;
            counts[i] += if h >> 63 == 0 { 1.0 } else { -1.0 };
        };
        for word in lower
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
        {
            add(word.as_bytes(), 1);
            if let Some(p) = prev {
                let mut pair = String::with_capacity(p.len() + word.len() + 1);
                pair.push_str(p);
                pair.push(' ');
                pair.push_str(word);
                add(pair.as_bytes(), 2);
            }
            prev = Some(word);
        }
        for c in &mut counts {
            if *c != 0.0 {
                *c = c.signum() * (1.0 + c.abs().ln());
            }
        }
        unit_length(&mut counts);
        counts
    }
}

impl Default for HashEmbedder {
    fn default() -> Self {
        HashEmbedder::new(256)
    }
}

impl Embedder for HashEmbedder {
    fn id(&self) -> &str {
        &self.id
    }

    fn dim(&self) -> usize {
        self.dim
    }

    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError> {
        Ok(texts.iter().map(|t| self.one(t)).collect())
    }
}

/// Hashed character trigrams of the lower-cased words (each word padded with spaces, so
/// "password" gives " pa", "pas", …, "rd "): a retyped text — a typo, a dropped or added word,
/// other case or punctuation — keeps most of its trigrams, while a text that differs in a few
/// content words loses many. The lexical near-duplicate detector (`harvest`'s default); MinHash
/// over shingles asks the same question, with a cosine instead of a Jaccard estimate.
#[derive(Debug, Clone)]
pub struct CharGramEmbedder {
    dim: usize,
    id: String,
}

impl CharGramEmbedder {
    pub fn new(dim: usize) -> CharGramEmbedder {
        let dim = dim.max(8);
        CharGramEmbedder {
            dim,
            id: format!("chargram-{dim}"),
        }
    }

    fn one(&self, text: &str) -> Vec<f32> {
        let mut counts = vec![0f32; self.dim];
        let mut buf: Vec<char> = Vec::with_capacity(32);
        for word in text
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
        {
            buf.clear();
            buf.push(' ');
            buf.extend(word.chars().flat_map(char::to_lowercase));
            buf.push(' ');
            let mut gram = [0u8; 12];
            for w in buf.windows(3) {
                let mut n = 0;
                for c in w {
                    n += c.encode_utf8(&mut gram[n..]).len();
                }
                let h = xxh3_64_with_seed(&gram[..n], 3);
                counts[(h % self.dim as u64) as usize] += if h >> 63 == 0 { 1.0 } else { -1.0 };
            }
        }
        unit_length(&mut counts);
        counts
    }
}

impl Embedder for CharGramEmbedder {
    fn id(&self) -> &str {
        &self.id
    }

    fn dim(&self) -> usize {
        self.dim
    }

    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError> {
        Ok(texts.iter().map(|t| self.one(t)).collect())
    }
}

/// Scales `v` to length 1 (a zero vector stays zero).
fn unit_length(v: &mut [f32]) {
    let norm = v.iter().map(|c| c * c).sum::<f32>().sqrt();
    if norm > 0.0 {
        for c in v {
            *c /= norm;
        }
    }
}

/// Cosine similarity of two unit vectors: their dot product, over eight lanes so the compiler
/// can vectorize it (a plain iterator sum must keep its order and stays scalar; harvest's
/// near-duplicate search runs it against every example).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}
