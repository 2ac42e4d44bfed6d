//! SVG plots with plotters: line charts and grouped bar charts. Text is written as SVG `<text>`
//! elements that the viewer renders, so no font library is needed here.

use std::path::Path;

use anyhow::anyhow;
use plotters::coord::Shift;
use plotters::prelude::*;

const SIZE: (u32, u32) = (900, 520);

/// One named line of a line chart.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// A line chart with one line per series.
#[derive(Debug, Clone)]
pub struct LineChart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    /// Logarithmic x axis; every x must then be positive.
    pub log_x: bool,
    /// Logarithmic y axis; every y must then be positive.
    pub log_y: bool,
    /// Legend to the right of the plot instead of inside its upper left corner, for charts whose
    /// lines fill every corner.
    pub legend_outside: bool,
    pub series: Vec<Series>,
}

/// Series with more points than this are drawn as lines without point markers.
const MAX_MARKED_POINTS: usize = 60;

/// Formats an axis label: whole numbers without decimals, others with up to 2 decimals.
fn axis_label(value: &f64) -> String {
    if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{value:.0}")
    } else {
        let text = format!("{value:.2}");
        text.trim_end_matches('0').trim_end_matches('.').to_owned()
    }
}

fn plot_error(error: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("failed to draw the plot: {error}")
}

fn color(index: usize) -> RGBColor {
    const COLORS: [RGBColor; 8] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
    ];
    COLORS[index % COLORS.len()]
}

/// Range of the finite values among `values`, widened so that a single value still has a span.
fn span(values: impl Iterator<Item = f64>, log: bool) -> (f64, f64) {
    let finite: Vec<f64> = values
        .filter(|v| v.is_finite() && (!log || *v > 0.0))
        .collect();
    let low = finite.iter().copied().fold(f64::INFINITY, f64::min);
    let high = finite.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    match (low.is_finite(), log) {
        (false, _) => (1.0, 10.0),
        (true, true) => (low / 1.5, high * 1.5),
        (true, false) if high > low => (low.min(0.0), high * 1.1),
        (true, false) => (low.min(0.0), high.abs().max(1.0) * 1.1),
    }
}

/// Draws `chart` into an SVG file at `path`.
pub fn line_chart(path: &Path, chart: &LineChart) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let all = || chart.series.iter().flat_map(|s| s.points.iter());
    let x = span(all().map(|p| p.0), chart.log_x);
    let y = span(all().map(|p| p.1), chart.log_y);
    let area = if chart.legend_outside {
        let (area, legend) = root.split_horizontally(SIZE.0 - LEGEND_WIDTH);
        draw_legend(&legend, &chart.series)?;
        area
    } else {
        root.clone()
    };
    match (chart.log_x, chart.log_y) {
        (false, false) => draw_lines(&area, chart, x.0..x.1, y.0..y.1),
        (true, false) => draw_lines(&area, chart, (x.0..x.1).log_scale(), y.0..y.1),
        (false, true) => draw_lines(&area, chart, x.0..x.1, (y.0..y.1).log_scale()),
        (true, true) => draw_lines(&area, chart, (x.0..x.1).log_scale(), (y.0..y.1).log_scale()),
    }?;
    root.present().map_err(plot_error)
}

/// Width in pixels of a legend drawn beside the plot.
const LEGEND_WIDTH: u32 = 210;

/// Draws one line sample and name per series, top to bottom.
fn draw_legend(area: &DrawingArea<SVGBackend<'_>, Shift>, series: &[Series]) -> anyhow::Result<()> {
    for (index, series) in series.iter().enumerate() {
        let y = 60 + 22 * index as i32;
        let style = color(index).stroke_width(2);
        area.draw(&PathElement::new(vec![(5, y), (30, y)], style))
            .map_err(plot_error)?;
        let font = ("sans-serif", 13).into_font().color(&BLACK);
        area.draw(&Text::new(series.name.clone(), (38, y - 7), font))
            .map_err(plot_error)?;
    }
    Ok(())
}

fn draw_lines<X, Y>(
    root: &DrawingArea<SVGBackend<'_>, Shift>,
    chart: &LineChart,
    x: X,
    y: Y,
) -> anyhow::Result<()>
where
    X: plotters::coord::ranged1d::AsRangedCoord<Value = f64>,
    Y: plotters::coord::ranged1d::AsRangedCoord<Value = f64>,
    X::CoordDescType: plotters::coord::ranged1d::ValueFormatter<f64>,
    Y::CoordDescType: plotters::coord::ranged1d::ValueFormatter<f64>,
{
    let mut context = ChartBuilder::on(root)
        .caption(&chart.title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(x, y)
        .map_err(plot_error)?;
    context
        .configure_mesh()
        .x_desc(chart.x_label.as_str())
        .y_desc(chart.y_label.as_str())
        .x_label_formatter(&axis_label)
        .y_label_formatter(&axis_label)
        .draw()
        .map_err(plot_error)?;
    for (index, series) in chart.series.iter().enumerate() {
        let style = color(index).stroke_width(2);
        context
            .draw_series(LineSeries::new(series.points.iter().copied(), style))
            .map_err(plot_error)?
            .label(series.name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        if series.points.len() <= MAX_MARKED_POINTS {
            context
                .draw_series(
                    series
                        .points
                        .iter()
                        .map(|point| Circle::new(*point, 3, color(index).filled())),
                )
                .map_err(plot_error)?;
        }
    }
    if chart.legend_outside {
        return Ok(());
    }
    context
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(plot_error)
}

/// A bar chart with one group of bars per category and one bar per series within a group.
#[derive(Debug, Clone)]
pub struct GroupedBars {
    pub title: String,
    pub y_label: String,
    pub categories: Vec<String>,
    /// Each series has one value per category.
    pub series: Vec<(String, Vec<f64>)>,
}

/// Draws grouped bars into an SVG file at `path`.
pub fn grouped_bars(path: &Path, chart: &GroupedBars) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let (_, high) = span(chart.series.iter().flat_map(|s| s.1.iter().copied()), false);
    let groups = chart.categories.len().max(1) as f64;
    let categories = chart.categories.clone();
    let mut context = ChartBuilder::on(&root)
        .caption(&chart.title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..groups, 0.0..high)
        .map_err(plot_error)?;
    context
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(categories.len() * 2 + 1)
        .x_label_formatter(&|x| {
            // Labels sit at the centre of each group, x = index + 0.5.
            let index = x.floor() as usize;
            if (x - x.floor() - 0.5).abs() < 1e-6 {
                categories.get(index).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc(chart.y_label.as_str())
        .y_label_formatter(&axis_label)
        .draw()
        .map_err(plot_error)?;
    let width = 0.8 / chart.series.len().max(1) as f64;
    for (index, (name, values)) in chart.series.iter().enumerate() {
        let fill = color(index).filled();
        let bars = values.iter().enumerate().filter(|(_, v)| v.is_finite());
        context
            .draw_series(bars.map(|(group, value)| {
                let left = group as f64 + 0.1 + width * index as f64;
                Rectangle::new([(left, 0.0), (left + width * 0.9, *value)], fill)
            }))
            .map_err(plot_error)?
            .label(name.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 15, y + 5)], fill));
    }
    context
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(plot_error)?;
    root.present().map_err(plot_error)
}
