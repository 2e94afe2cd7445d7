//! Finds CubeCL's `CUstream` for a stream id in the `Debug` text of CubeCL 0.10's CUDA server.
//!
//! CubeCL 0.10 keeps its CUDA streams private (`CudaServer.streams: MultiStream<..>`, a
//! `StreamPool` whose `Vec<Option<StreamWrapper>>` holds `Stream { sys: CUstream, .. }`), but the
//! whole server derives `Debug`, which prints every field, raw pointers as `0x…`. The pool has
//! `max_streams` regular slots plus one special (garbage-collection) slot, and a stream id maps
//! to slot `id % max_streams` (`cubecl_runtime::stream::base::stream_index`). This module parses
//! that text; [`crate::stream`] checks the result with the CUDA driver before using it.
//!
//! Pure string handling, unit-tested on the CPU against the exact shape `derive(Debug)` prints.

use std::fmt;

/// The anchor printed by `MultiStream`'s and `StreamPool`'s derived `Debug`.
const POOL_ANCHOR: &str = "streams: StreamPool { streams: [";

/// Why the stream could not be found in the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ParseError {
    /// The `StreamPool` anchor is missing (CubeCL's layout changed).
    NoPool,
    /// The slot list is not closed or has fewer than 2 slots.
    BadList,
    /// The slot for the stream id holds `None` (stream not created yet).
    Uninitialized { slot: usize, slots: usize },
    /// The slot has no `sys: 0x…` field.
    NoPointer { slot: usize },
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::NoPool => write!(f, "no `{POOL_ANCHOR}` in the CUDA server's Debug text"),
            ParseError::BadList => write!(f, "malformed stream slot list"),
            ParseError::Uninitialized { slot, slots } => {
                write!(f, "stream slot {slot} of {slots} is not initialized")
            }
            ParseError::NoPointer { slot } => {
                write!(f, "stream slot {slot} has no `sys: 0x` field")
            }
        }
    }
}

/// Splits the top-level, comma-separated elements of a Debug list starting right after `[`.
/// Returns the elements and the byte length consumed up to the closing `]`.
fn split_list(text: &str) -> Option<Vec<&str>> {
    let bytes = text.as_bytes();
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    let mut start = 0usize;
    let mut items = Vec::new();
    for (i, &ch) in bytes.iter().enumerate() {
        if in_string {
            match ch {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match ch {
            b'"' => in_string = true,
            b'[' | b'(' | b'{' => depth += 1,
            b']' | b')' | b'}' => {
                if depth == 0 {
                    // The list's own closing bracket.
                    let last = text[start..i].trim();
                    if !last.is_empty() {
                        items.push(last);
                    }
                    return Some(items);
                }
                depth -= 1;
            }
            b',' if depth == 0 => {
                items.push(text[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    None
}

/// Parses the `sys: 0x…` pointer of the slot for `stream_id_value` out of the server's Debug text
/// (`format!("{server:?}")`). Returns `(pointer, slot, number of regular slots)`.
pub(crate) fn find_stream(
    text: &str,
    stream_id_value: u64,
) -> Result<(u64, usize, usize), ParseError> {
    let at = text.find(POOL_ANCHOR).ok_or(ParseError::NoPool)?;
    let items = split_list(&text[at + POOL_ANCHOR.len()..]).ok_or(ParseError::BadList)?;
    if items.len() < 2 {
        return Err(ParseError::BadList);
    }
    // `max_streams` regular slots, then `num_special = 1` (MultiStream::new).
    let max_streams = items.len() - 1;
    let slot = (stream_id_value % max_streams as u64) as usize;
    let item = items[slot];
    if !item.starts_with("Some(") {
        return Err(ParseError::Uninitialized {
            slot,
            slots: max_streams,
        });
    }
    let sys = item.find("sys: 0x").ok_or(ParseError::NoPointer { slot })?;
    let hex: String = item[sys + "sys: 0x".len()..]
        .chars()
        .take_while(char::is_ascii_hexdigit)
        .collect();
    let ptr = u64::from_str_radix(&hex, 16).map_err(|_| ParseError::NoPointer { slot })?;
    if ptr == 0 {
        return Err(ParseError::NoPointer { slot });
    }
    Ok((ptr, slot, max_streams))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape `derive(Debug)` prints for CubeCL 0.10's `CudaServer` (trimmed fields, real nesting).
    fn server_text(slots: &[Option<u64>]) -> String {
        let items: Vec<String> = slots
            .iter()
            .map(|s| match s {
                None => "None".to_string(),
                Some(p) => format!(
                    "Some(StreamWrapper {{ stream: Stream {{ sys: {p:#x}, memory_management_gpu: \
                     MemoryManagement {{ name: \"Main GPU Memory, [odd] {{name}}\", pools: [A, B] }}, \
                     errors: [], drop_queue: PendingDropQueue {{ fences: [] }} }}, cursor: 3, \
                     last_synced: {{}} }})"
                ),
            })
            .collect();
        format!(
            "CudaServer {{ ctx: CudaContext {{ context: 0x5555, module_names: {{KernelId {{ info: \"sys: 0xdead\" }}: CompiledKernel {{ func: 0x1 }}}} }}, \
             device_id: DeviceId {{ type_id: 0, index_id: 0 }}, streams: MultiStream {{ \
             streams: StreamPool {{ streams: [{}], factory: EventStreamBackendWrapper {{ backend: CudaStreamBackend {{ }} }}, max_streams: {} }}, \
             logger: ServerLogger, max_streams: {}, gc: GcThread {{ sender: SyncSender {{ .. }} }}, shared_bindings_pool: [] }}, \
             utilities: ServerUtilities, comm_stream: 0x7777, communicators: {{}} }}",
            items.join(", "),
            slots.len() - 1,
            slots.len() - 1
        )
    }

    #[test]
    fn finds_the_slot_of_the_stream_id() {
        let mut slots = vec![None; 5];
        slots[1] = Some(0x7f00_0000_1234);
        slots[3] = Some(0x7f00_0000_abcd);
        slots[4] = Some(0x7f00_0000_0ff0); // the special GC slot
        let text = server_text(&slots);
        assert_eq!(find_stream(&text, 1).unwrap(), (0x7f00_0000_1234, 1, 4));
        assert_eq!(find_stream(&text, 7).unwrap(), (0x7f00_0000_abcd, 3, 4));
        assert_eq!(
            find_stream(&text, 2),
            Err(ParseError::Uninitialized { slot: 2, slots: 4 })
        );
    }

    #[test]
    fn pretty_and_broken_inputs() {
        assert_eq!(find_stream("CudaServer { }", 0), Err(ParseError::NoPool));
        assert_eq!(
            find_stream("streams: StreamPool { streams: [None", 0),
            Err(ParseError::BadList)
        );
        let text = "streams: StreamPool { streams: [Some(StreamWrapper { stream: Stream { x: 1 } }), None] }";
        assert_eq!(find_stream(text, 0), Err(ParseError::NoPointer { slot: 0 }));
    }
}
