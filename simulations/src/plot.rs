//! Line charts as SVG (plotters): axes with ticks and units, a legend, log scales where
//! the figures span decades.

use plotters::prelude::*;

/// One line of a chart: its name in the legend and its points.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// A chart's frame.
pub struct Chart<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub log_x: bool,
    pub log_y: bool,
}

/// The range the points span, widened a little (and kept positive on a log scale).
fn span(values: impl Iterator<Item = f64>, log: bool) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite() && (!log || *v > 0.0))
        .fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if lo > hi {
        return (if log { 1.0 } else { 0.0 }, 10.0);
    }
    if log {
        (lo / 2.0, hi * 2.0)
    } else {
        let pad = ((hi - lo) * 0.05).max(1e-9);
        ((lo - pad).min(0.0f64.max(lo - pad)), hi + pad)
    }
}

/// The legend of the series drawn so far, boxed, at `position`.
fn legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    c: &mut ChartContext<'a, DB, CT>,
    position: SeriesLabelPosition,
) -> Result<(), String> {
    c.configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())
}

/// Draws `series` as lines with markers; returns the SVG text.
pub fn line_chart(chart: &Chart, series: &[Series]) -> Result<String, String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, 520)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let points = || series.iter().flat_map(|s| s.points.iter().copied());
        let (x0, x1) = span(points().map(|p| p.0), chart.log_x);
        let (y0, y1) = span(points().map(|p| p.1), chart.log_y);
        let mut builder = ChartBuilder::on(&root);
        builder.caption(chart.title, ("sans-serif", 20)).margin(16).x_label_area_size(48).y_label_area_size(72);
        // plotters types a log axis apart from a linear one: four cases, one drawing.
        macro_rules! draw {
            ($x:expr, $y:expr) => {{
                let mut c = builder.build_cartesian_2d($x, $y).map_err(|e| e.to_string())?;
                c.configure_mesh()
                    .x_desc(chart.x_label)
                    .y_desc(chart.y_label)
                    .x_label_formatter(&|v| format_number(*v))
                    .y_label_formatter(&|v| format_number(*v))
                    .draw()
                    .map_err(|e| e.to_string())?;
                for (i, s) in series.iter().enumerate() {
                    let color = Palette99::pick(i).to_rgba();
                    c.draw_series(LineSeries::new(s.points.iter().copied(), color.stroke_width(2)))
                        .map_err(|e| e.to_string())?
                        .label(s.name.as_str())
                        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
                    c.draw_series(s.points.iter().map(|p| Circle::new(*p, 3, color.filled())))
                        .map_err(|e| e.to_string())?;
                }
                legend(&mut c, SeriesLabelPosition::UpperLeft)?;
            }};
        }
        match (chart.log_x, chart.log_y) {
            (true, true) => draw!((x0..x1).log_scale(), (y0..y1).log_scale()),
            (true, false) => draw!((x0..x1).log_scale(), y0..y1),
            (false, true) => draw!(x0..x1, (y0..y1).log_scale()),
            (false, false) => draw!(x0..x1, y0..y1),
        }
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

/// A span of time drawn in one colour on a timeline, with what it stands for.
pub struct Span {
    pub from: f64,
    pub to: f64,
    /// Index into the timeline's `kinds`.
    pub kind: usize,
}

/// Spans of time coloured by kind, on one row, with a time axis and a legend of the
/// kinds (name, colour); returns the SVG text.
pub fn timeline(
    title: &str,
    x_label: &str,
    t_max: f64,
    kinds: &[(&str, RGBColor)],
    spans: &[Span],
) -> Result<String, String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, 220)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let mut c = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(16)
            .build_cartesian_2d(0.0..t_max.max(1.0), 0.0..1.0)
            .map_err(|e| e.to_string())?;
        c.configure_mesh()
            .x_desc(x_label)
            .x_label_formatter(&|v| format_number(*v))
            .disable_y_mesh()
            .y_labels(0)
            .draw()
            .map_err(|e| e.to_string())?;
        for (k, (name, colour)) in kinds.iter().enumerate() {
            let colour = *colour;
            let rects = spans
                .iter()
                .filter(|s| s.kind == k)
                .map(|s| Rectangle::new([(s.from, 0.25), (s.to.max(s.from), 0.75)], colour.filled()));
            c.draw_series(rects)
                .map_err(|e| e.to_string())?
                .label(*name)
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], colour.filled()));
        }
        legend(&mut c, SeriesLabelPosition::UpperRight)?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

/// A tick label: 1,000 as "1k", 2,500,000 as "2.5M", small numbers as they are.
fn format_number(v: f64) -> String {
    let a = v.abs();
    let (scaled, unit) = if a >= 1e6 {
        (v / 1e6, "M")
    } else if a >= 1e3 {
        (v / 1e3, "k")
    } else {
        (v, "")
    };
    let text = if scaled.fract().abs() < 1e-9 { format!("{scaled:.0}") } else { format!("{scaled:.1}") };
    format!("{text}{unit}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_log_chart_has_its_axes_labels_and_legend() {
        let series = vec![
            Series { name: "metrics".into(), points: vec![(10.0, 900.0), (1000.0, 1900.0), (10000.0, 2000.0)] },
            Series { name: "have records".into(), points: vec![(10.0, 20.0), (1000.0, 30.0), (10000.0, 31.0)] },
        ];
        let chart = Chart { title: "per node", x_label: "nodes", y_label: "bytes/s", log_x: true, log_y: true };
        let svg = line_chart(&chart, &series).expect("chart");
        for text in ["per node", "nodes", "bytes/s", "metrics", "have records", "10k", "1k"] {
            assert!(svg.contains(text), "no {text:?} in the chart");
        }
        assert_eq!(format_number(2_500_000.0), "2.5M");
        let kinds =
            [("pending", RGBColor(187, 187, 187)), ("pass", RGBColor(44, 160, 44)), ("fail", RGBColor(214, 39, 40))];
        let spans = [Span { from: 0.0, to: 30.0, kind: 0 }, Span { from: 30.0, to: 61.0, kind: 2 }];
        let svg = timeline("gates", "seconds", 61.0, &kinds, &spans).expect("timeline");
        for text in ["gates", "seconds", "pending", "pass", "fail", "60"] {
            assert!(svg.contains(text), "no {text:?} in the timeline");
        }
        assert_eq!(format_number(0.5), "0.5");
    }
}
