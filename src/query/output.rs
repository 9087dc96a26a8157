//! Printing query results: an aligned table for people, CSV and JSON lines for programs.

use std::io::Write;

use arrow::array::{Array, RecordBatch};
use arrow::util::display::{ArrayFormatter, FormatOptions};

use super::QueryError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// Aligned columns; long cells are cut to --max-width characters.
    Table,
    /// RFC 4180 CSV with a header row; nested values as text.
    Csv,
    /// One JSON object per row.
    Json,
}

fn cells(batch: &RecordBatch) -> Result<Vec<Vec<Option<String>>>, QueryError> {
    let opts = FormatOptions::default();
    let mut cols = Vec::with_capacity(batch.num_columns());
    for col in batch.columns() {
        let f = ArrayFormatter::try_new(col.as_ref(), &opts)?;
        cols.push(
            (0..batch.num_rows())
                .map(|i| (!col.is_null(i)).then(|| f.value(i).to_string()))
                .collect(),
        );
    }
    Ok(cols)
}

fn cut(s: &str, max: usize) -> String {
    let flat: String = s
        .chars()
        .map(|c| {
            if c == '\n' || c == '\t' || c == '\r' {
                ' '
            } else {
                c
            }
        })
        .collect();
    if flat.chars().count() <= max {
        return flat;
    }
    let mut out: String = flat.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

/// Writes the batches in `format`. `max_width` applies to the table format only.
pub fn write_batches(
    out: &mut dyn Write,
    batches: &[RecordBatch],
    format: OutputFormat,
    max_width: usize,
) -> Result<(), QueryError> {
    let io = |source| QueryError::Io {
        path: "<stdout>".into(),
        source,
    };
    let Some(first) = batches.first() else {
        if format == OutputFormat::Table {
            writeln!(out, "(0 rows)").map_err(io)?;
        }
        return Ok(());
    };
    let schema = first.schema();
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    match format {
        OutputFormat::Csv => {
            writeln!(
                out,
                "{}",
                names
                    .iter()
                    .map(|n| csv_field(n))
                    .collect::<Vec<_>>()
                    .join(",")
            )
            .map_err(io)?;
            for batch in batches {
                let cols = cells(batch)?;
                for row in 0..batch.num_rows() {
                    let line: Vec<String> = cols
                        .iter()
                        .map(|c| c[row].as_deref().map(csv_field).unwrap_or_default())
                        .collect();
                    writeln!(out, "{}", line.join(",")).map_err(io)?;
                }
            }
        }
        OutputFormat::Json => {
            let mut w = arrow::json::LineDelimitedWriter::new(&mut *out);
            for batch in batches {
                w.write(batch)?;
            }
            w.finish()?;
        }
        OutputFormat::Table => {
            let mut rows: Vec<Vec<String>> = Vec::new();
            for batch in batches {
                let cols = cells(batch)?;
                for row in 0..batch.num_rows() {
                    rows.push(
                        cols.iter()
                            .map(|c| {
                                c[row]
                                    .as_deref()
                                    .map_or_else(|| "NULL".to_owned(), |s| cut(s, max_width))
                            })
                            .collect(),
                    );
                }
            }
            let mut widths: Vec<usize> = names.iter().map(|n| n.chars().count()).collect();
            for r in &rows {
                for (w, c) in widths.iter_mut().zip(r) {
                    *w = (*w).max(c.chars().count());
                }
            }
            let numeric: Vec<bool> = schema
                .fields()
                .iter()
                .map(|f| f.data_type().is_numeric())
                .collect();
            let line = |cells: &[String], out: &mut dyn Write| -> std::io::Result<()> {
                let parts: Vec<String> = cells
                    .iter()
                    .zip(&widths)
                    .zip(&numeric)
                    .map(|((c, w), num)| {
                        let pad = w - c.chars().count();
                        if *num {
                            format!("{}{c}", " ".repeat(pad))
                        } else {
                            format!("{c}{}", " ".repeat(pad))
                        }
                    })
                    .collect();
                writeln!(out, "│ {} │", parts.join(" │ "))
            };
            let rule = |l: &str, m: &str, r: &str| {
                format!(
                    "{l}{}{r}",
                    widths
                        .iter()
                        .map(|w| "─".repeat(w + 2))
                        .collect::<Vec<_>>()
                        .join(m)
                )
            };
            writeln!(out, "{}", rule("┌", "┬", "┐")).map_err(io)?;
            line(
                &names.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                out,
            )
            .map_err(io)?;
            writeln!(out, "{}", rule("├", "┼", "┤")).map_err(io)?;
            for r in &rows {
                line(r, out).map_err(io)?;
            }
            writeln!(out, "{}", rule("└", "┴", "┘")).map_err(io)?;
            writeln!(
                out,
                "({} row{})",
                rows.len(),
                if rows.len() == 1 { "" } else { "s" }
            )
            .map_err(io)?;
        }
    }
    Ok(())
}
