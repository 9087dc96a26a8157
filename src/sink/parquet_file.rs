//! One Arrow batch → one fsynced Parquet file.

use std::fs;
use std::path::Path;

use arrow::array::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;

use super::{SinkError, Table, io_err};
use crate::config::SinkConfig;
use crate::event::{EVENT_LOW_CARDINALITY_COLUMNS, EVENT_SCHEMA_VERSION, EVENT_TEXT_COLUMNS};

fn properties(table: Table, config: &SinkConfig) -> WriterProperties {
    let level = ZstdLevel::try_new(config.zstd_level).unwrap_or_default();
    let mut b = WriterProperties::builder()
        .set_compression(Compression::ZSTD(level))
        .set_max_row_group_row_count(Some(config.row_group_rows))
        .set_created_by(format!("telltale {}", env!("CARGO_PKG_VERSION")))
        .set_key_value_metadata(Some(vec![
            KeyValue::new("telltale.table".into(), table.name().to_owned()),
            KeyValue::new(
                "telltale.schema_version".into(),
                EVENT_SCHEMA_VERSION.to_owned(),
            ),
        ]));
    let long_text: &[&str] = match table {
        Table::Events => EVENT_TEXT_COLUMNS,
        Table::Rejects => &["error", "raw", "key"],
        Table::Metrics => &[
            "latency_ms_hist",
            "ttft_ms_hist",
            "input_tokens_hist",
            "output_tokens_hist",
            "cost_usd_hist",
        ],
        Table::Alerts => &["error"],
        Table::Drift | Table::Scores => &["explanation"],
        Table::Quality | Table::Harvest => &[],
        Table::Experiments => &["reason"],
    };
    for col in long_text {
        // Mostly-unique long text: dictionaries and page statistics cost time and buy nothing.
        let path = ColumnPath::from(*col);
        b = b
            .set_column_dictionary_enabled(path.clone(), false)
            .set_column_statistics_enabled(path, EnabledStatistics::None);
    }
    if matches!(table, Table::Metrics | Table::Quality) {
        // Small files (a window's rows) with many narrow columns: zstd's per-column-chunk
        // setup would cost more than it saves, except on the histograms.
        b = b.set_compression(Compression::UNCOMPRESSED);
        for col in long_text {
            b = b.set_column_compression(ColumnPath::from(*col), Compression::ZSTD(level));
        }
    }
    if table == Table::Events {
        for col in EVENT_LOW_CARDINALITY_COLUMNS {
            b = b.set_column_compression(ColumnPath::from(*col), Compression::UNCOMPRESSED);
        }
    }
    b.build()
}

/// Writes `batch` to `path` and fsyncs it; returns the file's size.
pub fn write_parquet(
    path: &Path,
    batch: &RecordBatch,
    table: Table,
    config: &SinkConfig,
) -> Result<u64, SinkError> {
    let file = fs::File::create(path).map_err(io_err(path))?;
    let pq = |source| SinkError::Parquet {
        path: path.to_owned(),
        source,
    };
    let mut writer =
        ArrowWriter::try_new(&file, batch.schema(), Some(properties(table, config))).map_err(pq)?;
    writer.write(batch).map_err(pq)?;
    writer.close().map_err(pq)?;
    file.sync_all().map_err(io_err(path))?;
    Ok(file.metadata().map_err(io_err(path))?.len())
}
