//! SQL over the Parquet tables, with DataFusion.
//!
//! Every directory under the data root whose name does not start with `_` or `.` is a table
//! (`events`, `rejects`, …), registered as a listing table over its Hive layout, so `date` and
//! `hour` are columns and filters on them prune files. `events` and `rejects` are registered
//! with their known schemas, so they can be queried (empty) before any file exists.
//! Reading is lock-free: writers only ever rename complete files into place.

mod output;

use std::path::Path;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, SchemaRef};
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::ListingOptions;
use datafusion::prelude::SessionContext;

pub use output::{OutputFormat, write_batches};

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    DataFusion(#[from] datafusion::error::DataFusionError),
    #[error("{0}")]
    Arrow(#[from] arrow::error::ArrowError),
}

fn known_schema(table: &str) -> Option<SchemaRef> {
    match table {
        "events" => Some(crate::event::event_schema()),
        "rejects" => Some(crate::rejects::reject_schema()),
        "alerts" => Some(crate::alert::table::alerts_schema()),
        "scores" => Some(crate::quality::table::score_schema()),
        _ => None,
    }
}

/// The tables found under `root`, sorted.
pub fn table_names(root: &Path) -> Result<Vec<String>, QueryError> {
    let mut names = Vec::new();
    let entries = match std::fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(names),
        Err(source) => {
            return Err(QueryError::Io {
                path: root.display().to_string(),
                source,
            });
        }
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        // A table is a directory of Hive partitions (`date=…`); anything else (a folder of
        // .eml files, a user's notes) is not one.
        let partitioned = std::fs::read_dir(entry.path()).is_ok_and(|mut d| {
            d.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().starts_with("date=")))
        });
        if partitioned && !name.starts_with('_') && !name.starts_with('.') {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// A DataFusion session with every table under `root` registered (and `events`, `rejects`
/// always, even when empty).
pub async fn session(root: &Path) -> Result<SessionContext, QueryError> {
    let ctx = SessionContext::new();
    crate::metrics::udf::register(&ctx);
    let root = if root.exists() {
        std::fs::canonicalize(root).map_err(|source| QueryError::Io {
            path: root.display().to_string(),
            source,
        })?
    } else {
        root.to_owned()
    };
    let mut names = table_names(&root)?;
    for t in ["events", "rejects", "alerts", "scores"] {
        if !names.iter().any(|n| n == t) {
            names.push(t.to_owned());
        }
    }
    for name in names {
        let dir = root.join(&name);
        let schema = known_schema(&name);
        if schema.is_none() && !dir.exists() {
            continue;
        }
        let options = ListingOptions::new(Arc::new(ParquetFormat::default()))
            .with_file_extension(".parquet")
            .with_table_partition_cols(vec![
                ("date".to_owned(), DataType::Utf8),
                ("hour".to_owned(), DataType::Utf8),
            ]);
        let url = format!("file://{}/", dir.display());
        if let (Some(schema), false) = (&schema, dir.exists()) {
            // An empty table with the known schema: register over an empty in-memory batch.
            let mut fields: Vec<_> = schema.fields().iter().cloned().collect();
            fields.push(Arc::new(arrow::datatypes::Field::new(
                "date",
                DataType::Utf8,
                true,
            )));
            fields.push(Arc::new(arrow::datatypes::Field::new(
                "hour",
                DataType::Utf8,
                true,
            )));
            let full = Arc::new(arrow::datatypes::Schema::new(fields));
            let mem = datafusion::datasource::MemTable::try_new(full, vec![vec![]])?;
            ctx.register_table(name.as_str(), Arc::new(mem))?;
            continue;
        }
        ctx.register_listing_table(name.as_str(), url, options, schema, None)
            .await?;
    }
    Ok(ctx)
}

/// Runs one SQL statement and collects its result.
pub async fn query(ctx: &SessionContext, sql: &str) -> Result<Vec<RecordBatch>, QueryError> {
    Ok(ctx.sql(sql).await?.collect().await?)
}

/// Opens a session over `root` and runs `sql`.
pub async fn run_sql(root: &Path, sql: &str) -> Result<Vec<RecordBatch>, QueryError> {
    let ctx = session(root).await?;
    query(&ctx, sql).await
}
