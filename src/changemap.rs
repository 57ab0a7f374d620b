//! Where training moves the weights: the bytes each generation changed, summed per layer and per
//! tensor kind (`report`), and drawn as a heat map (`report --svg`).
//!
//! Every generation already records the byte ranges it changed in each file (the index's
//! `generation_ranges`, kept for `export-delta`). [`ChangeMap::build`] lays those ranges over
//! the tensors of the files and sums the changed bytes into cells of (layer, tensor kind), one
//! set of cells per generation. Names are split where their first number is
//! ([`tensor_group`]): `model.layers.12.mlp.up_proj.weight` is layer 12 of `model.layers`, kind
//! `mlp.up_proj.weight`; later numbers (experts) become `*`; a name without a number (embeddings,
//! the final norm, `lm_head`) is its own kind in the row `other`. This works for any naming
//! scheme that numbers its layers (`h.0.attn…`, `model.visual.blocks.3…`), not only Qwen's.
//!
//! [`render_svg`] draws, with plotters' SVG backend: the bytes changed per generation (bars), the
//! share of each layer's bytes changed per generation, the same per tensor kind, and layer ×
//! kind over the whole range. Shares use a logarithmic color scale (viridis, 0.01% to 100%) so a
//! sparse step (one element in 0.5% of blocks) is as visible as a dense one; a cell that did not
//! change at all is light gray.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use plotters::coord::ranged1d::{IntoSegmentedCoord, SegmentValue};
use plotters::prelude::*;
use plotters::style::colors::colormaps::ViridisRGB;
use serde::Serialize;

use crate::index::{GenerationKind, Tags};

/// The row of tensors whose names carry no layer number.
pub const OTHER_LAYER: &str = "other";

/// The fill of a cell with no changed byte.
pub const UNCHANGED_FILL: RGBColor = RGBColor(0xe8, 0xe8, 0xe8);
/// The fill of the bars of bytes changed per generation.
pub const BAR_FILL: RGBColor = RGBColor(0x4c, 0x72, 0xb0);
/// Steps of the color bar drawn beside the heat maps.
pub const LEGEND_STEPS: usize = 40;
/// The smallest share the color scale tells apart from 0 (0.01%); smaller shares get its color.
const MIN_SHARE: f64 = 1e-4;

/// Where a tensor belongs in the map: its layer, if its name numbers one, and its kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorGroup {
    /// The layer stack (`model.layers`) and number, or `None` for a tensor outside the layers.
    pub layer: Option<(String, u64)>,
    /// What the tensor is within its layer (`mlp.up_proj.weight`, `mlp.experts.*.w1`), or its
    /// whole name outside the layers.
    pub kind: String,
}

/// Splits a tensor name at its first all-digit segment (see the module docs).
pub fn tensor_group(name: &str) -> TensorGroup {
    let segments: Vec<&str> = name.split('.').collect();
    let number = segments
        .iter()
        .enumerate()
        .skip(1)
        .find(|(_, s)| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|(i, s)| s.parse::<u64>().ok().map(|n| (i, n)));
    match number {
        Some((i, n)) => {
            let kind: Vec<&str> = segments[i + 1..]
                .iter()
                .map(|s| {
                    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
                        "*"
                    } else {
                        s
                    }
                })
                .collect();
            TensorGroup {
                layer: Some((segments[..i].join("."), n)),
                kind: if kind.is_empty() {
                    "(whole layer)".to_owned()
                } else {
                    kind.join(".")
                },
            }
        }
        None => TensorGroup {
            layer: None,
            kind: name.strip_prefix("model.").unwrap_or(name).to_owned(),
        },
    }
}

/// A tensor as the map needs it: where its bytes are and its name.
#[derive(Clone, Debug)]
pub struct TensorSpan {
    /// Its file, relative to the model directory.
    pub file: String,
    /// Absolute offset of its data in the file.
    pub offset: u64,
    /// Bytes.
    pub len: u64,
    /// Its name.
    pub name: String,
}

/// One generation of the map.
#[derive(Clone, Debug, Serialize)]
pub struct GenerationColumn {
    /// Its number.
    pub generation: u64,
    /// What made it.
    pub kind: GenerationKind,
    /// `sync --tag` pairs.
    pub tags: Tags,
    /// Bytes of tensor data it changed (its ranges laid over the tensors).
    pub bytes_changed: u64,
}

/// A generation with the ranges it changed, per file (as the index keeps them).
pub struct GenerationChanges {
    /// Its number.
    pub generation: u64,
    /// What made it.
    pub kind: GenerationKind,
    /// Its tags.
    pub tags: Tags,
    /// (file, sorted merged (offset, len) ranges).
    pub ranges: Vec<(String, Vec<(u64, u64)>)>,
}

/// Changed bytes per (layer, kind) cell and generation.
#[derive(Clone, Debug)]
pub struct ChangeMap {
    /// Row labels of the layers, in order (stack, then number; `other` last).
    pub layers: Vec<String>,
    /// Tensor kinds, sorted by name.
    pub kinds: Vec<String>,
    /// Bytes of each cell, `layers.len() × kinds.len()`, layer-major; 0 where no tensor is.
    pub cell_bytes: Vec<u64>,
    /// The generations, oldest first.
    pub generations: Vec<GenerationColumn>,
    /// Changed bytes per generation, each `layers.len() × kinds.len()`, layer-major.
    pub changed: Vec<Vec<u64>>,
}

/// Totals of one row of the map over the whole range.
#[derive(Clone, Debug, Serialize)]
pub struct RowTotal {
    /// The layer or kind.
    pub name: String,
    /// Its bytes.
    pub bytes: u64,
    /// Bytes changed, summed over the generations.
    pub bytes_changed: u64,
}

impl ChangeMap {
    /// Lays each generation's ranges over `tensors` and sums the changed bytes per cell.
    pub fn build(tensors: &[TensorSpan], generations: Vec<GenerationChanges>) -> ChangeMap {
        let groups: Vec<TensorGroup> = tensors.iter().map(|t| tensor_group(&t.name)).collect();
        let (layers, layer_of) = layer_rows(&groups);
        let kinds: Vec<String> = groups
            .iter()
            .map(|g| g.kind.clone())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let kind_index: HashMap<&str, usize> = kinds
            .iter()
            .enumerate()
            .map(|(i, k)| (k.as_str(), i))
            .collect();
        let cell_of: Vec<usize> = groups
            .iter()
            .zip(&layer_of)
            .map(|(g, &l)| l * kinds.len() + kind_index[g.kind.as_str()])
            .collect();
        let mut cell_bytes = vec![0u64; layers.len() * kinds.len()];
        for (t, &c) in tensors.iter().zip(&cell_of) {
            cell_bytes[c] += t.len;
        }
        // Each file's tensors, sorted by offset, for the sweep.
        let mut by_file: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, t) in tensors.iter().enumerate() {
            by_file.entry(t.file.as_str()).or_default().push(i);
        }
        for list in by_file.values_mut() {
            list.sort_by_key(|&i| tensors[i].offset);
        }
        let mut columns = Vec::with_capacity(generations.len());
        let mut changed = Vec::with_capacity(generations.len());
        for g in generations {
            let mut cells = vec![0u64; cell_bytes.len()];
            for (file, ranges) in &g.ranges {
                if let Some(list) = by_file.get(file.as_str()) {
                    sweep(tensors, list, ranges, |i, n| cells[cell_of[i]] += n);
                }
            }
            columns.push(GenerationColumn {
                generation: g.generation,
                kind: g.kind,
                tags: g.tags,
                bytes_changed: cells.iter().sum(),
            });
            changed.push(cells);
        }
        ChangeMap {
            layers,
            kinds,
            cell_bytes,
            generations: columns,
            changed,
        }
    }

    /// The cells of a layer (`Axis::Layer`: a contiguous run, the map being layer-major) or of a
    /// tensor kind (`Axis::Kind`: one per layer).
    fn cells(&self, axis: Axis, row: usize) -> impl Iterator<Item = usize> + use<> {
        let k = self.kinds.len();
        let (first, step, count) = match axis {
            Axis::Layer => (row * k, 1, k),
            Axis::Kind => (row, k, self.layers.len()),
        };
        (0..count).map(move |j| first + j * step)
    }

    /// Per layer or per tensor kind: bytes and bytes changed over the whole range.
    pub fn totals(&self, axis: Axis) -> Vec<RowTotal> {
        let names = match axis {
            Axis::Layer => &self.layers,
            Axis::Kind => &self.kinds,
        };
        names
            .iter()
            .enumerate()
            .map(|(row, name)| RowTotal {
                name: name.clone(),
                bytes: self.cells(axis, row).map(|c| self.cell_bytes[c]).sum(),
                bytes_changed: self
                    .changed
                    .iter()
                    .map(|g| self.cells(axis, row).map(|c| g[c]).sum::<u64>())
                    .sum(),
            })
            .collect()
    }

    /// Bytes changed in a layer or kind by generation `g` (index into `generations`), and its
    /// bytes.
    fn cell(&self, g: usize, axis: Axis, row: usize) -> (u64, u64) {
        (
            self.cells(axis, row).map(|c| self.changed[g][c]).sum(),
            self.cells(axis, row).map(|c| self.cell_bytes[c]).sum(),
        )
    }
}

/// The rows of a total: layers or tensor kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Axis {
    /// One row per layer (and `other`).
    Layer,
    /// One row per tensor kind.
    Kind,
}

/// Calls `add(tensor, bytes)` for every overlap of `ranges` (sorted, merged) with the tensors
/// `list` (indices into `tensors`, sorted by offset, not overlapping).
fn sweep(
    tensors: &[TensorSpan],
    list: &[usize],
    ranges: &[(u64, u64)],
    mut add: impl FnMut(usize, u64),
) {
    let mut first = 0;
    for &(start, len) in ranges {
        let end = start.saturating_add(len);
        while first < list.len() && {
            let t = &tensors[list[first]];
            t.offset + t.len <= start
        } {
            first += 1;
        }
        for &i in &list[first..] {
            let t = &tensors[i];
            if t.offset >= end {
                break;
            }
            let overlap = end.min(t.offset + t.len) - start.max(t.offset);
            add(i, overlap);
        }
    }
}

/// The layer rows: labels in order, and each group's row. Stacks are labelled without the
/// prefix they all share (`model.`); with one stack, a row is its number alone.
fn layer_rows(groups: &[TensorGroup]) -> (Vec<String>, Vec<usize>) {
    let keys: std::collections::BTreeSet<(&str, u64)> = groups
        .iter()
        .filter_map(|g| g.layer.as_ref().map(|(s, n)| (s.as_str(), *n)))
        .collect();
    let stacks: std::collections::BTreeSet<&str> = keys.iter().map(|(s, _)| *s).collect();
    let shared = if stacks.len() > 1 {
        common_segments(&stacks.iter().copied().collect::<Vec<_>>())
    } else {
        0
    };
    let mut labels = Vec::with_capacity(keys.len() + 1);
    let mut row: BTreeMap<(&str, u64), usize> = BTreeMap::new();
    for (i, &(stack, n)) in keys.iter().enumerate() {
        labels.push(if stacks.len() == 1 {
            n.to_string()
        } else {
            let short: Vec<&str> = stack.split('.').skip(shared).collect();
            format!("{} {n}", short.join("."))
        });
        row.insert((stack, n), i);
    }
    let other = labels.len();
    if groups.iter().any(|g| g.layer.is_none()) {
        labels.push(OTHER_LAYER.to_owned());
    }
    let of = groups
        .iter()
        .map(|g| match &g.layer {
            Some((s, n)) => row[&(s.as_str(), *n)],
            None => other,
        })
        .collect();
    (labels, of)
}

/// How many leading dot-separated segments all of `stacks` share, leaving each at least one.
fn common_segments(stacks: &[&str]) -> usize {
    let split: Vec<Vec<&str>> = stacks.iter().map(|s| s.split('.').collect()).collect();
    let shortest = split.iter().map(Vec::len).min().unwrap_or(0);
    (0..shortest.saturating_sub(1))
        .take_while(|&i| split.iter().all(|s| s[i] == split[0][i]))
        .count()
}

/// The color of a share of changed bytes (see the module docs).
pub fn share_color(changed: u64, bytes: u64) -> RGBColor {
    if changed == 0 || bytes == 0 {
        return UNCHANGED_FILL;
    }
    let share = (changed as f64 / bytes as f64).clamp(MIN_SHARE, 1.0);
    let t = (share.log10() - MIN_SHARE.log10()) / -MIN_SHARE.log10();
    ViridisRGB::get_color_normalized(t as f32, 0.0, 1.0)
}

/// Height of one heat-map row, in pixels.
const ROW: u32 = 14;
/// Width of the row labels, in pixels.
const LABEL_WIDTH: u32 = 260;
/// Width of the color bar and its labels, in pixels.
const LEGEND_WIDTH: u32 = 110;

/// Draws `map` as an SVG document (see the module docs); `title` heads it.
pub fn render_svg(map: &ChangeMap, title: &str) -> Result<String, String> {
    let gens = map.generations.len().max(1) as u32;
    let cell = (900 / gens).clamp(6, 28);
    let layer_cell = (900 / (map.layers.len().max(1) as u32)).clamp(8, 28);
    let width = LABEL_WIDTH
        + 40
        + (gens * cell)
            .max(map.layers.len() as u32 * layer_cell)
            .max(300)
        + LEGEND_WIDTH;
    let heights = [
        40,
        200,
        map.layers.len() as u32 * ROW + 90,
        map.kinds.len() as u32 * ROW + 90,
        map.kinds.len() as u32 * ROW + 100,
    ];
    let height: u32 = heights.iter().sum();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let (main, legend) = root.split_horizontally(width - LEGEND_WIDTH);
        let mut breaks = Vec::new();
        let mut y = 0;
        for h in &heights[..heights.len() - 1] {
            y += h;
            breaks.push(y);
        }
        let areas = main.split_by_breakpoints::<u32, u32, _, _>([], breaks);
        areas[0]
            .titled(title, ("sans-serif", 18))
            .map_err(|e| e.to_string())?;
        draw_totals(map, &areas[1], cell)?;
        let generations: Vec<String> = map
            .generations
            .iter()
            .map(|g| g.generation.to_string())
            .collect();
        HeatMap {
            caption: "Share of each layer's bytes changed, per generation".to_owned(),
            columns: &generations,
            x_desc: "generation",
            rows: &map.layers,
            cell,
            value: |g, l| Some(map.cell(g, Axis::Layer, l)),
        }
        .draw(&areas[2])?;
        HeatMap {
            caption: "Share of each tensor kind's bytes changed, per generation".to_owned(),
            columns: &generations,
            x_desc: "generation",
            rows: &map.kinds,
            cell,
            value: |g, i| Some(map.cell(g, Axis::Kind, i)),
        }
        .draw(&areas[3])?;
        // A block may change in every generation: the share is of the cell's bytes times the
        // generations, the mean share per generation. No tensor of that kind: blank.
        let k = map.kinds.len();
        let runs = map.generations.len().max(1) as u64;
        HeatMap {
            caption: format!(
                "Mean share of bytes changed per generation, by layer and tensor kind ({}–{})",
                generations.first().map_or("", String::as_str),
                generations.last().map_or("", String::as_str)
            ),
            columns: &map.layers,
            x_desc: "layer",
            rows: &map.kinds,
            cell: layer_cell,
            value: |l, i| {
                let bytes = map.cell_bytes[l * k + i];
                let changed = map.changed.iter().map(|c| c[l * k + i]).sum();
                (bytes > 0).then_some((changed, bytes * runs))
            },
        }
        .draw(&areas[4])?;
        draw_legend(&legend, heights[0] + heights[1])?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

/// The label of row `v` of `rows`, drawn top to bottom.
fn row_label(rows: &[String], v: &SegmentValue<u32>) -> String {
    match v {
        SegmentValue::CenterOf(y) if (*y as usize) < rows.len() => {
            rows[rows.len() - 1 - *y as usize].clone()
        }
        _ => String::new(),
    }
}

/// How many x labels to ask for: every column when they fit, fewer otherwise.
fn x_label_count(columns: usize, cell: u32) -> usize {
    if cell >= 22 {
        columns
    } else {
        columns.min((columns * cell as usize / 40).max(2))
    }
}

/// Bars: the bytes each generation changed.
fn draw_totals<DB: DrawingBackend>(
    map: &ChangeMap,
    area: &DrawingArea<DB, plotters::coord::Shift>,
    cell: u32,
) -> Result<(), String> {
    let n = map.generations.len() as u32;
    let top = map
        .generations
        .iter()
        .map(|g| g.bytes_changed)
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let area = area.margin(0, 0, 0, 0);
    let (area, _) = area.split_horizontally(LABEL_WIDTH + 20 + n * cell);
    let mut chart = ChartBuilder::on(&area)
        .caption("Bytes changed per generation", ("sans-serif", 14))
        .margin_right(20)
        .x_label_area_size(30)
        .y_label_area_size(LABEL_WIDTH)
        .build_cartesian_2d((0..n.max(1) - 1).into_segmented(), 0.0..top * 1.05)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(x_label_count(n as usize, cell))
        .y_labels(4)
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => map
                .generations
                .get(*i as usize)
                .map(|g| g.generation.to_string())
                .unwrap_or_default(),
            _ => String::new(),
        })
        .y_label_formatter(&|v| crate::human_bytes(*v as u64))
        .x_desc("generation")
        .draw()
        .map_err(|e| e.to_string())?;
    chart
        .draw_series(map.generations.iter().enumerate().map(|(i, g)| {
            let i = i as u32;
            Rectangle::new(
                [
                    (SegmentValue::Exact(i), 0.0),
                    (SegmentValue::Exact(i + 1), g.bytes_changed as f64),
                ],
                BAR_FILL.filled(),
            )
        }))
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// A heat map: one column per entry of `columns`, one row per entry of `rows` (top to bottom);
/// `value(c, r)` gives the changed bytes and bytes of a cell, `None` to leave it blank.
struct HeatMap<'a, F: Fn(usize, usize) -> Option<(u64, u64)>> {
    caption: String,
    columns: &'a [String],
    x_desc: &'a str,
    rows: &'a [String],
    cell: u32,
    value: F,
}

impl<F: Fn(usize, usize) -> Option<(u64, u64)>> HeatMap<'_, F> {
    fn draw<DB: DrawingBackend>(
        &self,
        area: &DrawingArea<DB, plotters::coord::Shift>,
    ) -> Result<(), String> {
        let n = self.columns.len() as u32;
        let r = self.rows.len() as u32;
        let (area, _) = area.split_horizontally(LABEL_WIDTH + 20 + n * self.cell);
        let mut chart = ChartBuilder::on(&area)
            .caption(&self.caption, ("sans-serif", 14))
            .margin_right(20)
            .x_label_area_size(36)
            .y_label_area_size(LABEL_WIDTH)
            .build_cartesian_2d(
                (0..n.max(1) - 1).into_segmented(),
                (0..r.max(1) - 1).into_segmented(),
            )
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .disable_mesh()
            .x_labels(x_label_count(self.columns.len(), self.cell))
            .y_labels(self.rows.len())
            .x_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) => {
                    self.columns.get(*i as usize).cloned().unwrap_or_default()
                }
                _ => String::new(),
            })
            .y_label_formatter(&|v| row_label(self.rows, v))
            .x_desc(self.x_desc)
            .draw()
            .map_err(|e| e.to_string())?;
        let cells = (0..self.columns.len()).flat_map(|c| {
            (0..self.rows.len()).filter_map(move |row| {
                let (changed, bytes) = (self.value)(c, row)?;
                let (x, y) = (c as u32, r - 1 - row as u32);
                Some(Rectangle::new(
                    [
                        (SegmentValue::Exact(x), SegmentValue::Exact(y)),
                        (SegmentValue::Exact(x + 1), SegmentValue::Exact(y + 1)),
                    ],
                    share_color(changed, bytes).filled(),
                ))
            })
        });
        chart.draw_series(cells).map_err(|e| e.to_string())?;
        Ok(())
    }
}

/// The color bar: [`LEGEND_STEPS`] steps from 0.01% to 100%, and the color of "unchanged".
fn draw_legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    top: u32,
) -> Result<(), String> {
    let text = ("sans-serif", 12).into_text_style(area);
    let x = 10i32;
    let bar_top = top as i32 + 30;
    let step = 6i32;
    area.draw(&Text::new("share changed", (x, bar_top - 20), text.clone()))
        .map_err(|e| e.to_string())?;
    for s in 0..LEGEND_STEPS {
        // Top is 100%, bottom 0.01%.
        let t = 1.0 - s as f64 / (LEGEND_STEPS - 1) as f64;
        let color = ViridisRGB::get_color_normalized(t as f32, 0.0, 1.0);
        let y = bar_top + s as i32 * step;
        area.draw(&Rectangle::new(
            [(x, y), (x + 16, y + step)],
            color.filled(),
        ))
        .map_err(|e| e.to_string())?;
    }
    let bar_height = LEGEND_STEPS as i32 * step;
    for (i, label) in ["100%", "10%", "1%", "0.1%", "0.01%"].iter().enumerate() {
        let y = bar_top + (bar_height - step) * i as i32 / 4;
        area.draw(&Text::new(*label, (x + 22, y), text.clone()))
            .map_err(|e| e.to_string())?;
    }
    let y = bar_top + bar_height + 16;
    area.draw(&Rectangle::new(
        [(x, y), (x + 16, y + 12)],
        UNCHANGED_FILL.filled(),
    ))
    .map_err(|e| e.to_string())?;
    area.draw(&Text::new("unchanged", (x + 22, y), text))
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// A range of generations as `report --generations` takes it: `A..B` (both included), `A..`,
/// `..B` or `N`; an open end is the first generation after init or the newest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GenerationRange {
    /// First generation, if given.
    pub first: Option<u64>,
    /// Last generation (included), if given.
    pub last: Option<u64>,
}

impl std::str::FromStr for GenerationRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let number = |t: &str| -> Result<Option<u64>, String> {
            let t = t.trim();
            if t.is_empty() {
                return Ok(None);
            }
            t.parse::<u64>().map(Some).map_err(|_| {
                format!("`{t}` is not a generation number (expected A..B, A.., ..B or N)")
            })
        };
        let range = if let Some((a, b)) = s.split_once("..") {
            GenerationRange {
                first: number(a)?,
                last: number(b)?,
            }
        } else {
            let n = number(s)?.ok_or("an empty range (expected A..B, A.., ..B or N)")?;
            GenerationRange {
                first: Some(n),
                last: Some(n),
            }
        };
        if let (Some(a), Some(b)) = (range.first, range.last)
            && a > b
        {
            return Err(format!(
                "{a}..{b} is empty: the first generation comes after the last"
            ));
        }
        Ok(range)
    }
}

/// A table of the row totals with a changed byte over `generations` generations, for the text
/// output: changed bytes, size, and the mean share changed per generation.
pub fn totals_text(rows: &[RowTotal], generations: usize) -> String {
    let mut s = String::new();
    if rows.iter().all(|r| r.bytes_changed == 0) {
        s.push_str("  (nothing changed)\n");
        return s;
    }
    let _ = writeln!(
        s,
        "  {:<40} {:>12} {:>12} {:>14}",
        "", "changed", "size", "mean per gen."
    );
    for r in rows.iter().filter(|r| r.bytes_changed > 0) {
        let share = if r.bytes == 0 {
            0.0
        } else {
            100.0 * r.bytes_changed as f64 / (r.bytes as f64 * generations.max(1) as f64)
        };
        let _ = writeln!(
            s,
            "  {:<40} {:>12} {:>12} {share:>13.3}%",
            r.name,
            crate::human_bytes(r.bytes_changed),
            crate::human_bytes(r.bytes)
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(file: &str, offset: u64, len: u64, name: &str) -> TensorSpan {
        TensorSpan {
            file: file.into(),
            offset,
            len,
            name: name.into(),
        }
    }

    #[test]
    fn names_split_at_their_first_number() {
        let g = tensor_group("model.layers.12.mlp.up_proj.weight");
        assert_eq!(g.layer, Some(("model.layers".into(), 12)));
        assert_eq!(g.kind, "mlp.up_proj.weight");
        let g = tensor_group("model.layers.3.mlp.experts.17.down_proj.weight");
        assert_eq!(g.kind, "mlp.experts.*.down_proj.weight");
        let g = tensor_group("h.0.attn.c_attn.weight");
        assert_eq!(g.layer, Some(("h".into(), 0)));
        let g = tensor_group("model.embed_tokens.weight");
        assert_eq!(g.layer, None);
        assert_eq!(g.kind, "embed_tokens.weight");
        assert_eq!(tensor_group("lm_head.weight").kind, "lm_head.weight");
        // A leading number is not a layer; an empty segment is not a number.
        assert_eq!(tensor_group("0.weight").layer, None);
        assert_eq!(tensor_group("a..b").layer, None);
    }

    #[test]
    fn ranges_are_laid_over_the_tensors_they_touch() {
        let tensors = vec![
            span("a", 100, 50, "model.layers.0.w"),
            span("a", 150, 50, "model.layers.1.w"),
            span("a", 200, 100, "model.norm.weight"),
            span("b", 8, 10, "model.layers.1.v"),
        ];
        let map = ChangeMap::build(
            &tensors,
            vec![GenerationChanges {
                generation: 4,
                kind: GenerationKind::Sync,
                tags: Tags::default(),
                // One range over the end of layer 0 and the start of layer 1, one in the norm,
                // one in a file the index does not know.
                ranges: vec![
                    ("a".into(), vec![(140, 20), (290, 10)]),
                    ("b".into(), vec![(8, 1)]),
                    ("c".into(), vec![(0, 100)]),
                ],
            }],
        );
        assert_eq!(map.layers, ["0", "1", OTHER_LAYER]);
        assert_eq!(map.kinds, ["norm.weight", "v", "w"]);
        let layers = map.totals(Axis::Layer);
        assert_eq!(
            layers.iter().map(|r| r.bytes_changed).collect::<Vec<_>>(),
            [10, 11, 10]
        );
        assert_eq!(
            layers.iter().map(|r| r.bytes).collect::<Vec<_>>(),
            [50, 60, 100]
        );
        let kinds = map.totals(Axis::Kind);
        assert_eq!(
            kinds.iter().map(|r| r.bytes_changed).collect::<Vec<_>>(),
            [10, 1, 20]
        );
        assert_eq!(map.generations[0].bytes_changed, 31);
    }

    #[test]
    fn several_stacks_are_labelled_without_their_shared_prefix() {
        let tensors = vec![
            span("a", 0, 8, "model.visual.blocks.0.attn.qkv.weight"),
            span(
                "a",
                8,
                8,
                "model.language_model.layers.0.mlp.up_proj.weight",
            ),
        ];
        let map = ChangeMap::build(&tensors, Vec::new());
        assert_eq!(map.layers, ["language_model.layers 0", "visual.blocks 0"]);
    }

    #[test]
    fn generation_ranges_parse() {
        let r = |s: &str| s.parse::<GenerationRange>();
        assert_eq!(
            r("3..9"),
            Ok(GenerationRange {
                first: Some(3),
                last: Some(9)
            })
        );
        assert_eq!(
            r("3.."),
            Ok(GenerationRange {
                first: Some(3),
                last: None
            })
        );
        assert_eq!(
            r("..9"),
            Ok(GenerationRange {
                first: None,
                last: Some(9)
            })
        );
        assert_eq!(
            r("7"),
            Ok(GenerationRange {
                first: Some(7),
                last: Some(7)
            })
        );
        assert!(r("9..3").unwrap_err().contains("empty"));
        assert!(r("x..3").unwrap_err().contains("not a generation"));
        assert!(r("").is_err());
    }

    #[test]
    fn shares_use_a_log_scale_and_unchanged_is_gray() {
        assert_eq!(share_color(0, 100), UNCHANGED_FILL);
        let tiny = share_color(1, 1_000_000_000);
        assert_eq!(tiny, share_color(1, 10_000), "below 0.01% saturates");
        assert_ne!(share_color(1, 1000), share_color(1, 100));
        assert_eq!(
            share_color(7, 7),
            ViridisRGB::get_color_normalized(1.0, 0.0, 1.0)
        );
    }
}
