//! `loss.png`: the loss curve of a run, drawn without a plotting stack (no fonts needed; the
//! exact values are in `metrics.csv`). Axes frame the plot, ticks mark tenths of the step and
//! loss ranges, and the curve is drawn between consecutive steps.

use std::path::Path;

use super::StepRecord;
use crate::error::Result;
use crate::export::write_file;

const WIDTH: usize = 640;
const HEIGHT: usize = 400;
const MARGIN: usize = 40;
const CURVE: [u8; 3] = [31, 119, 180];
const AXIS: [u8; 3] = [0, 0, 0];

/// An RGB canvas, row-major from the top-left corner.
struct Canvas {
    pixels: Vec<u8>,
}

impl Canvas {
    fn new() -> Self {
        Self {
            pixels: vec![255; WIDTH * HEIGHT * 3],
        }
    }

    fn set(&mut self, x: usize, y: usize, color: [u8; 3]) {
        if x < WIDTH && y < HEIGHT {
            let at = (y * WIDTH + x) * 3;
            self.pixels[at..at + 3].copy_from_slice(&color);
        }
    }

    /// Bresenham's line, two pixels thick for the curve to stand out.
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), color: [u8; 3]) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            for (ox, oy) in [(0, 0), (1, 0), (0, 1)] {
                self.set((x + ox) as usize, (y + oy) as usize, color);
            }
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }
}

/// Pixel position of each record: x by step, y by loss (top = highest loss).
fn points(history: &[StepRecord]) -> Vec<(i64, i64)> {
    let (first, last) = (
        history[0].step as f64,
        history[history.len() - 1].step as f64,
    );
    let lo = history.iter().map(|r| r.loss).fold(f64::INFINITY, f64::min);
    let hi = history
        .iter()
        .map(|r| r.loss)
        .fold(f64::NEG_INFINITY, f64::max);
    let (plot_w, plot_h) = ((WIDTH - 2 * MARGIN) as f64, (HEIGHT - 2 * MARGIN) as f64);
    history
        .iter()
        .map(|r| {
            let fx = if last > first {
                (r.step as f64 - first) / (last - first)
            } else {
                0.5
            };
            let fy = if hi > lo {
                (r.loss - lo) / (hi - lo)
            } else {
                0.5
            };
            (
                (MARGIN as f64 + fx * plot_w).round() as i64,
                (MARGIN as f64 + (1.0 - fy) * plot_h).round() as i64,
            )
        })
        .collect()
}

/// Encodes the loss curve of `history` as a PNG.
fn render(history: &[StepRecord]) -> Vec<u8> {
    let mut canvas = Canvas::new();
    let (left, right) = (MARGIN as i64, (WIDTH - MARGIN) as i64);
    let (top, bottom) = (MARGIN as i64, (HEIGHT - MARGIN) as i64);
    canvas.line((left, bottom), (right, bottom), AXIS);
    canvas.line((left, top), (left, bottom), AXIS);
    for tick in 0..=10 {
        let x = left + (right - left) * tick / 10;
        let y = bottom - (bottom - top) * tick / 10;
        canvas.line((x, bottom), (x, bottom + 5), AXIS);
        canvas.line((left - 5, y), (left, y), AXIS);
    }
    let pts = points(history);
    for pair in pts.windows(2) {
        canvas.line(pair[0], pair[1], CURVE);
    }
    if let [only] = pts[..] {
        canvas.line(only, only, CURVE);
    }
    let mut bytes = Vec::new();
    let mut encoder = png::Encoder::new(&mut bytes, WIDTH as u32, HEIGHT as u32);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder
        .write_header()
        .expect("writing to memory cannot fail");
    writer
        .write_image_data(&canvas.pixels)
        .expect("the canvas matches the header");
    drop(writer);
    bytes
}

/// Writes the loss curve of `history` to `path` (atomically). Nothing is written for an empty
/// history.
///
/// # Errors
/// I/O failures naming the file.
pub fn write_loss_curve(path: &Path, history: &[StepRecord]) -> Result<()> {
    if history.is_empty() {
        return Ok(());
    }
    write_file(path, &render(history))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(step: usize, loss: f64) -> StepRecord {
        StepRecord {
            step,
            loss,
            lr: 0.0,
            grad_norm: None,
            tokens: 0,
        }
    }

    #[test]
    fn curve_runs_from_top_left_to_bottom_right_for_a_falling_loss() {
        let history: Vec<StepRecord> = (1..=20).map(|s| record(s, 10.0 - s as f64 * 0.4)).collect();
        let png = render(&history);
        let decoder = png::Decoder::new(std::io::Cursor::new(png));
        let mut reader = decoder.read_info().unwrap();
        let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut pixels).unwrap();
        assert_eq!((info.width, info.height), (WIDTH as u32, HEIGHT as u32));
        let at = |x: usize, y: usize| &pixels[(y * WIDTH + x) * 3..(y * WIDTH + x) * 3 + 3];
        // A linear fall is the diagonal of the plot area: its ends and its midpoint are curve.
        assert_eq!(at(MARGIN, MARGIN), CURVE);
        assert_eq!(at(WIDTH - MARGIN, HEIGHT - MARGIN), CURVE);
        assert_eq!(at(WIDTH / 2, HEIGHT / 2), CURVE);
        // Above the diagonal, away from the axes, the canvas is blank.
        assert_eq!(at(WIDTH - 2 * MARGIN, 2 * MARGIN), [255, 255, 255]);
    }
}
