//! A static embedder (model2vec): one vector per vocabulary token, and a text's vector is the
//! normalized mean of its tokens' vectors — no attention, so hundreds of thousands of texts/s
//! on one core, enough to embed all traffic instead of a sample.
//!
//! No registry package ships a licensed model2vec model, so `telltale models distill` makes
//! one from the sentence model `scripts/models.sh` installed, the way model2vec distills
//! (Tulkens & van Dongen, *Model2Vec*, 2024): every token of all-MiniLM-L6-v2's vocabulary is
//! run through the transformer on its own (`[CLS] token [SEP]`, mean-pooled), the vectors are
//! reduced to 256 principal components, and each is weighted by `a / (a + p)` with `p` the
//! token's Zipf probability by vocabulary rank (`a` = 1e-4, smooth inverse frequency), so
//! frequent tokens count less in a mean. It is written in model2vec's own format
//! (`model.safetensors` with an `embeddings` tensor, `tokenizer.json`, `config.json`) into
//! `<models>/minilm-static-256/` and read with `model2vec-rs`; a model2vec model from
//! elsewhere (for instance minishlab/potion-base-8M) can be put there instead.

use std::path::{Path, PathBuf};

use model2vec_rs::model::StaticModel;
use ort::session::Session;
use ort::value::Tensor;

use super::embed::{EmbedError, Embedder};
use super::sentence::{MODEL, init_runtime};
use super::stats::Pca;

pub const STATIC_MODEL: &str = "minilm-static-256";
/// Principal components kept (model2vec's default).
pub const DIMS: usize = 256;
/// The smooth-inverse-frequency constant (model2vec's default).
const SIF: f64 = 1e-4;
const FIX: &str = "run `telltale models distill` (after `bash scripts/models.sh`) or set drift.embedder = \"hash\"";

/// Where the static model lives in the models directory.
pub fn static_dir(models: &Path) -> PathBuf {
    models.join(STATIC_MODEL)
}

/// Whether a static model is installed.
pub fn available(models: &Path) -> bool {
    let d = static_dir(models);
    ["model.safetensors", "tokenizer.json", "config.json"]
        .iter()
        .all(|f| d.join(f).exists())
}

fn failed(message: impl std::fmt::Display) -> EmbedError {
    EmbedError::Failed {
        embedder: format!("static/{STATIC_MODEL}"),
        message: message.to_string(),
    }
}

pub struct StaticEmbedder {
    model: StaticModel,
    id: String,
}

impl StaticEmbedder {
    /// Loads the static model of the models directory `models`.
    pub fn load(models: &Path) -> Result<StaticEmbedder, EmbedError> {
        let dir = static_dir(models);
        if !available(models) {
            return Err(failed(format!(
                "no static model in {}; {FIX}",
                dir.display()
            )));
        }
        let model = StaticModel::from_pretrained(&dir, None, Some(true), None)
            .map_err(|e| failed(format!("cannot load {}: {e:#}", dir.display())))?;
        let name = dir
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        Ok(StaticEmbedder {
            model,
            id: format!("static/{name}"),
        })
    }
}

impl Embedder for StaticEmbedder {
    fn id(&self) -> &str {
        &self.id
    }

    fn dim(&self) -> usize {
        self.model.dim()
    }

    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let owned: Vec<String> = texts.iter().map(|t| (*t).to_owned()).collect();
        Ok(self.model.encode_with_args(&owned, Some(512), 1024))
    }
}

/// Distills the static model from the sentence model in `models` (see the module docs) and
/// writes it into place; `progress(done, total)` after each batch of tokens.
pub fn distill(
    models: &Path,
    threads: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<PathBuf, EmbedError> {
    let src = models.join(MODEL);
    let read = |name: &str| -> Result<Vec<u8>, EmbedError> {
        let p = src.join(name);
        std::fs::read(&p).map_err(|e| {
            failed(format!(
                "{}: {e}; run `bash scripts/models.sh` first (the static model is distilled from the sentence model)",
                p.display()
            ))
        })
    };
    let tokenizer = read("tokenizer.json")?;
    let onnx = read("model.onnx")?;
    let json: serde_json::Value =
        serde_json::from_slice(&tokenizer).map_err(|e| failed(format!("tokenizer.json: {e}")))?;
    let vocab = json
        .pointer("/model/vocab")
        .and_then(|v| v.as_object())
        .ok_or_else(|| failed("tokenizer.json has no WordPiece vocabulary (model.vocab)"))?;
    let id_of = |t: &str| {
        vocab
            .get(t)
            .and_then(|v| v.as_i64())
            .ok_or_else(|| failed(format!("tokenizer.json lacks {t}")))
    };
    let (cls, sep) = (id_of("[CLS]")?, id_of("[SEP]")?);
    let size = vocab
        .values()
        .filter_map(|v| v.as_i64())
        .max()
        .unwrap_or(-1)
        + 1;

    init_runtime(models)?;
    let env = ort::init()
        .with_name("telltale-distill")
        .build()
        .map_err(|e| failed(format!("ONNX Runtime: {e}")))?;
    let mut session = Session::builder(&env)
        .and_then(|b| Ok(b.with_intra_threads(threads.max(1))?))
        .and_then(|mut b| b.commit_from_memory(&onnx))
        .map_err(|e| {
            failed(format!(
                "cannot load {}: {e}",
                src.join("model.onnx").display()
            ))
        })?;
    let token_types = session
        .inputs()
        .iter()
        .any(|i| i.name() == "token_type_ids");

    // Every token alone between [CLS] and [SEP], mean-pooled over the three positions.
    let mut vectors: Vec<Vec<f32>> = Vec::with_capacity(size as usize);
    let batch = 256i64;
    let mut start = 0i64;
    while start < size {
        let n = batch.min(size - start);
        let ids: Vec<i64> = (start..start + n).flat_map(|t| [cls, t, sep]).collect();
        let tensor = |v: Vec<i64>| {
            Tensor::from_array(([n as usize, 3], v)).map_err(|e| failed(format!("tensor: {e}")))
        };
        let mut inputs = ort::inputs![
            "input_ids" => tensor(ids)?,
            "attention_mask" => tensor(vec![1; 3 * n as usize])?,
        ];
        if token_types {
            inputs.push((
                "token_type_ids".into(),
                tensor(vec![0; 3 * n as usize])?.into(),
            ));
        }
        let out = session
            .run(inputs)
            .map_err(|e| failed(format!("inference: {e}")))?;
        let (shape, data) = out[0]
            .try_extract_tensor::<f32>()
            .map_err(|e| failed(format!("output: {e}")))?;
        let dim = shape.last().copied().unwrap_or(0) as usize;
        if shape.len() != 3 || dim == 0 {
            return Err(failed(format!("unexpected output shape {shape:?}")));
        }
        for row in data.chunks_exact(3 * dim) {
            let mut v = vec![0f32; dim];
            for pos in row.chunks_exact(dim) {
                for (o, x) in v.iter_mut().zip(pos) {
                    *o += x / 3.0;
                }
            }
            vectors.push(v);
        }
        start += n;
        progress(start as usize, size as usize);
    }

    let pca = Pca::fit_exact(&vectors, DIMS);
    let ranks: f64 = (0..vectors.len()).map(|r| 1.0 / (r as f64 + 2.0)).sum();
    let mut bytes = Vec::with_capacity(vectors.len() * DIMS * 4);
    for (rank, v) in vectors.iter().enumerate() {
        let p = 1.0 / (rank as f64 + 2.0) / ranks;
        let w = (SIF / (SIF + p)) as f32;
        for x in pca.project(v) {
            bytes.extend_from_slice(&(x * w).to_le_bytes());
        }
    }
    let rows = vectors.len();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![rows, DIMS], &bytes)
            .map_err(|e| failed(format!("safetensors: {e}")))?;
    let weights = safetensors::serialize([("embeddings", view)], None)
        .map_err(|e| failed(format!("safetensors: {e}")))?;
    let config = serde_json::json!({
        "model_type": "model2vec",
        "architectures": ["StaticModel"],
        "tokenizer_name": "sentence-transformers/all-MiniLM-L6-v2",
        "apply_pca": DIMS,
        "sif_coefficient": SIF,
        "hidden_dim": DIMS,
        "normalize": true,
        "distilled_by": concat!("telltale ", env!("CARGO_PKG_VERSION")),
    });

    // Written beside, then renamed into place: a half-written model is never loaded.
    let dir = static_dir(models);
    let part = models.join(format!("{STATIC_MODEL}.part"));
    let io = |e: std::io::Error| failed(format!("{}: {e}", part.display()));
    let _ = std::fs::remove_dir_all(&part);
    std::fs::create_dir_all(&part).map_err(io)?;
    std::fs::write(part.join("model.safetensors"), weights).map_err(io)?;
    std::fs::write(part.join("tokenizer.json"), &tokenizer).map_err(io)?;
    std::fs::write(
        part.join("config.json"),
        serde_json::to_vec_pretty(&config).expect("serializes"),
    )
    .map_err(io)?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&part, &dir).map_err(io)?;
    Ok(dir)
}
