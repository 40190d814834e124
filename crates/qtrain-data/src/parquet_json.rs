//! Arrow → JSON for Parquet rows, so Parquet records go through the same format
//! detection and field checks as JSON records. Covers what chat datasets use:
//! strings, numbers, booleans, lists and structs (e.g. `messages:
//! list<struct<role, content>>`); other types become a message naming the column.

use arrow_array::cast::AsArray;
use arrow_array::types::*;
use arrow_array::{Array, RecordBatch};
use arrow_schema::DataType;
use serde_json::{Map, Value};

pub fn row_to_json(batch: &RecordBatch, row: usize) -> Result<Value, String> {
    let schema = batch.schema();
    let mut obj = Map::with_capacity(batch.num_columns());
    for (field, col) in schema.fields().iter().zip(batch.columns()) {
        let v = cell(col.as_ref(), row).map_err(|t| format!("column `{}`: {t}", field.name()))?;
        obj.insert(field.name().clone(), v);
    }
    Ok(Value::Object(obj))
}

fn cell(a: &dyn Array, i: usize) -> Result<Value, String> {
    if a.is_null(i) {
        return Ok(Value::Null);
    }
    Ok(match a.data_type() {
        DataType::Null => Value::Null,
        DataType::Boolean => Value::Bool(a.as_boolean().value(i)),
        DataType::Utf8 => Value::String(a.as_string::<i32>().value(i).to_string()),
        DataType::LargeUtf8 => Value::String(a.as_string::<i64>().value(i).to_string()),
        DataType::Utf8View => Value::String(a.as_string_view().value(i).to_string()),
        DataType::Int8 => a.as_primitive::<Int8Type>().value(i).into(),
        DataType::Int16 => a.as_primitive::<Int16Type>().value(i).into(),
        DataType::Int32 => a.as_primitive::<Int32Type>().value(i).into(),
        DataType::Int64 => a.as_primitive::<Int64Type>().value(i).into(),
        DataType::UInt8 => a.as_primitive::<UInt8Type>().value(i).into(),
        DataType::UInt16 => a.as_primitive::<UInt16Type>().value(i).into(),
        DataType::UInt32 => a.as_primitive::<UInt32Type>().value(i).into(),
        DataType::UInt64 => a.as_primitive::<UInt64Type>().value(i).into(),
        DataType::Float32 => float(a.as_primitive::<Float32Type>().value(i) as f64),
        DataType::Float64 => float(a.as_primitive::<Float64Type>().value(i)),
        DataType::List(_) => list(a.as_list::<i32>().value(i).as_ref())?,
        DataType::LargeList(_) => list(a.as_list::<i64>().value(i).as_ref())?,
        DataType::Struct(fields) => {
            let s = a.as_struct();
            let mut obj = Map::with_capacity(fields.len());
            for (f, c) in fields.iter().zip(s.columns()) {
                obj.insert(f.name().clone(), cell(c.as_ref(), i)?);
            }
            Value::Object(obj)
        }
        other => return Err(format!("unsupported Parquet type {other}")),
    })
}

fn list(values: &dyn Array) -> Result<Value, String> {
    (0..values.len())
        .map(|j| cell(values, j))
        .collect::<Result<Vec<_>, _>>()
        .map(Value::Array)
}

fn float(x: f64) -> Value {
    serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)
}
