//! Line charts as PNG, for evidence in approvals and chat: a title, a value axis with its unit,
//! time labels in UTC, one line per series and the alert's start marked. Drawn with
//! embedded-graphics (its built-in bitmap font: no system font or library at run time) and
//! encoded with the `png` crate.

use embedded_graphics::mono_font::MonoTextStyle;
use embedded_graphics::mono_font::ascii::{FONT_6X10, FONT_7X13_BOLD};
use embedded_graphics::pixelcolor::Rgb888;
use embedded_graphics::prelude::*;
use embedded_graphics::primitives::{Line, PrimitiveStyle};
use embedded_graphics::text::{Alignment, Text};

/// Width and height of a chart, in pixels.
pub const WIDTH: u32 = 800;
/// Height.
pub const HEIGHT: u32 = 320;
const LEFT: i32 = 70;
const RIGHT: i32 = 20;
const TOP: i32 = 34;
const BOTTOM: i32 = 62;

/// The colours of the series, in order (the first is the one most charts have alone).
pub const PALETTE: [(u8, u8, u8); 6] = [
    (31, 119, 180),
    (214, 39, 40),
    (44, 160, 44),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
];
const MARKER: Rgb888 = Rgb888::new(255, 127, 14);
const AXIS: Rgb888 = Rgb888::new(60, 60, 60);
const GRID: Rgb888 = Rgb888::new(225, 225, 225);

/// One line: its label and its points (unix seconds, value).
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Shown in the legend.
    pub label: String,
    /// Points in time order; non-finite values are gaps.
    pub points: Vec<(i64, f64)>,
}

/// What to draw.
#[derive(Debug, Clone)]
pub struct Chart<'a> {
    /// Shown on top.
    pub title: &'a str,
    /// The values' unit, on the axis labels (`%`, `s`; empty: none).
    pub unit: &'a str,
    /// The time range shown, unix seconds.
    pub start: i64,
    /// End.
    pub end: i64,
    /// When the alert started, marked with a line (if within the range).
    pub marker: Option<i64>,
    /// The lines.
    pub series: &'a [Series],
}

struct Canvas {
    px: Vec<u8>,
}

impl OriginDimensions for Canvas {
    fn size(&self) -> Size {
        Size::new(WIDTH, HEIGHT)
    }
}

impl DrawTarget for Canvas {
    type Color = Rgb888;
    type Error = std::convert::Infallible;

    fn draw_iter<I: IntoIterator<Item = Pixel<Rgb888>>>(
        &mut self,
        pixels: I,
    ) -> Result<(), Self::Error> {
        for Pixel(p, c) in pixels {
            if (0..WIDTH as i32).contains(&p.x) && (0..HEIGHT as i32).contains(&p.y) {
                let i = (p.y as usize * WIDTH as usize + p.x as usize) * 3;
                self.px[i..i + 3].copy_from_slice(&[c.r(), c.g(), c.b()]);
            }
        }
        Ok(())
    }
}

/// A value as an axis shows it: three significant digits, `k`/`M`/`G` for large ones.
pub fn format_value(v: f64, unit: &str) -> String {
    let (scaled, suffix) = match v.abs() {
        a if a >= 1e9 => (v / 1e9, "G"),
        a if a >= 1e6 => (v / 1e6, "M"),
        a if a >= 1e4 => (v / 1e3, "k"),
        _ => (v, ""),
    };
    let digits = match scaled.abs() {
        a if a == 0.0 || a >= 100.0 => 0,
        a if a >= 10.0 => 1,
        a if a >= 1.0 => 2,
        _ => 3,
    };
    let text = format!("{scaled:.digits$}");
    let text = if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        text
    };
    let sep = if unit.is_empty() || unit == "%" {
        ""
    } else {
        " "
    };
    format!("{text}{suffix}{sep}{unit}")
}

/// Ticks at round values covering `lo..=hi` (1, 2 or 5 times a power of ten apart).
fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    let span = (hi - lo).max(f64::EPSILON);
    let raw = span / 4.0;
    let power = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * power)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * power);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    (first..=last).map(|i| i as f64 * step).collect()
}

/// `HH:MM` in UTC.
fn clock(t: i64) -> String {
    let day = t.rem_euclid(86_400);
    format!("{:02}:{:02}", day / 3600, day % 3600 / 60)
}

/// The chart as a PNG.
pub fn render(chart: &Chart) -> Vec<u8> {
    let mut canvas = Canvas {
        px: vec![255; (WIDTH * HEIGHT * 3) as usize],
    };
    draw(&mut canvas, chart);
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, WIDTH, HEIGHT);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    // Writing to memory cannot fail but for a wrong buffer size, which is ours to get right.
    let written = encoder
        .write_header()
        .and_then(|mut w| w.write_image_data(&canvas.px).and_then(|()| w.finish()));
    debug_assert!(written.is_ok(), "{written:?}");
    out
}

fn draw(canvas: &mut Canvas, chart: &Chart) {
    let (w, h) = (WIDTH as i32, HEIGHT as i32);
    let (x0, x1, y0, y1) = (LEFT, w - RIGHT, h - BOTTOM, TOP);
    let text = MonoTextStyle::new(&FONT_6X10, AXIS);
    let title = MonoTextStyle::new(&FONT_7X13_BOLD, Rgb888::BLACK);
    let values = chart
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1));
    let finite: Vec<f64> = values.filter(|v| v.is_finite()).collect();
    let (mut lo, mut hi) = finite
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(*v), hi.max(*v))
        });
    if finite.is_empty() {
        (lo, hi) = (0.0, 1.0);
    }
    // Start the axis at zero for values that are all positive (a rate, a ratio), and leave
    // room above the highest.
    if lo > 0.0 {
        lo = 0.0;
    }
    if hi <= lo {
        hi = lo + 1.0;
    }
    hi += (hi - lo) * 0.05;
    let span_t = (chart.end - chart.start).max(1) as f64;
    let px_x =
        |t: i64| x0 + ((t - chart.start) as f64 / span_t * f64::from(x1 - x0)).round() as i32;
    let px_y = |v: f64| y0 - ((v - lo) / (hi - lo) * f64::from(y0 - y1)).round() as i32;
    let stroke = |c: Rgb888, width: u32| PrimitiveStyle::with_stroke(c, width);
    let line = |canvas: &mut Canvas, a: Point, b: Point, style: PrimitiveStyle<Rgb888>| {
        let _ = Line::new(a, b).into_styled(style).draw(canvas);
    };
    let label = |canvas: &mut Canvas, s: &str, at: Point, align: Alignment, style| {
        let _ = Text::with_alignment(s, at, style, align).draw(canvas);
    };

    label(
        canvas,
        &clip(chart.title, 110),
        Point::new(w / 2, 20),
        Alignment::Center,
        title,
    );
    for v in ticks(lo, hi) {
        let y = px_y(v);
        line(
            canvas,
            Point::new(x0, y),
            Point::new(x1, y),
            stroke(GRID, 1),
        );
        label(
            canvas,
            &format_value(v, chart.unit),
            Point::new(x0 - 6, y + 3),
            Alignment::Right,
            text,
        );
    }
    let time_ticks = 6;
    for i in 0..=time_ticks {
        let t = chart.start + (chart.end - chart.start) * i / time_ticks;
        let x = px_x(t);
        line(
            canvas,
            Point::new(x, y0),
            Point::new(x, y0 + 4),
            stroke(AXIS, 1),
        );
        label(
            canvas,
            &clock(t),
            Point::new(x, y0 + 15),
            Alignment::Center,
            text,
        );
    }
    label(
        canvas,
        "time (UTC)",
        Point::new(x1, y0 + 28),
        Alignment::Right,
        text,
    );
    line(
        canvas,
        Point::new(x0, y1),
        Point::new(x0, y0),
        stroke(AXIS, 1),
    );
    line(
        canvas,
        Point::new(x0, y0),
        Point::new(x1, y0),
        stroke(AXIS, 1),
    );
    if let Some(m) = chart
        .marker
        .filter(|m| (chart.start..=chart.end).contains(m))
    {
        let x = px_x(m);
        for y in (y1..y0).step_by(8) {
            line(
                canvas,
                Point::new(x, y),
                Point::new(x, (y + 4).min(y0)),
                stroke(MARKER, 2),
            );
        }
        label(
            canvas,
            "alert",
            Point::new(x + 4, y1 + 10),
            Alignment::Left,
            MonoTextStyle::new(&FONT_6X10, MARKER),
        );
    }
    for (i, s) in chart.series.iter().enumerate() {
        let (r, g, b) = PALETTE[i % PALETTE.len()];
        let colour = Rgb888::new(r, g, b);
        for pair in s.points.windows(2) {
            let ((ta, va), (tb, vb)) = (pair[0], pair[1]);
            if va.is_finite() && vb.is_finite() {
                line(
                    canvas,
                    Point::new(px_x(ta), px_y(va)),
                    Point::new(px_x(tb), px_y(vb)),
                    stroke(colour, 2),
                );
            }
        }
        // A lone sample has no line to it: a short dash shows it.
        let mut finite = s.points.iter().filter(|p| p.1.is_finite());
        if let (Some(&(t, v)), None) = (finite.next(), finite.next()) {
            line(
                canvas,
                Point::new(px_x(t) - 2, px_y(v)),
                Point::new(px_x(t) + 2, px_y(v)),
                stroke(colour, 3),
            );
        }
        if i < 3 && !s.label.is_empty() {
            let y = h - 26 + 10 * i as i32;
            line(
                canvas,
                Point::new(x0, y - 3),
                Point::new(x0 + 14, y - 3),
                stroke(colour, 2),
            );
            label(
                canvas,
                &clip(&s.label, 100),
                Point::new(x0 + 20, y),
                Alignment::Left,
                text,
            );
        }
    }
    if chart.series.len() > 3 {
        let more = format!("and {} more series", chart.series.len() - 3);
        label(canvas, &more, Point::new(x1, h - 6), Alignment::Right, text);
    }
    if finite.is_empty() {
        label(
            canvas,
            "no data in this range",
            Point::new((x0 + x1) / 2, (y0 + y1) / 2),
            Alignment::Center,
            text,
        );
    }
}

/// At most `n` characters, with `…` (as `...`: the font is ASCII) where cut.
fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        return s.to_string();
    }
    let mut out: String = s.chars().take(n - 3).collect();
    out.push_str("...");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_values_read_as_people_write_them() {
        assert_eq!(format_value(0.0, "%"), "0%");
        assert_eq!(format_value(12.5, "%"), "12.5%");
        assert_eq!(format_value(0.0123, "s"), "0.012 s");
        assert_eq!(format_value(1500.0, ""), "1500");
        assert_eq!(format_value(25_000.0, "req/s"), "25k req/s");
        assert_eq!(format_value(3.2e9, "B"), "3.2G B");
    }

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        assert_eq!(ticks(0.0, 10.0), vec![0.0, 5.0, 10.0]);
        assert_eq!(ticks(0.0, 0.9), vec![0.0, 0.5]);
        assert_eq!(ticks(0.0, 11.5), vec![0.0, 5.0, 10.0]);
        assert_eq!(ticks(-3.0, 3.0), vec![-2.0, 0.0, 2.0]);
        assert_eq!(clock(3600 * 25 + 61), "01:01");
    }

    #[test]
    fn a_chart_is_a_png_of_its_size() {
        let series = [Series {
            label: "up".into(),
            points: (0..60).map(|i| (i * 60, f64::from(i as i32 % 7))).collect(),
        }];
        let png = render(&Chart {
            title: "t",
            unit: "",
            start: 0,
            end: 3600,
            marker: Some(1800),
            series: &series,
        });
        let decoder = png::Decoder::new(std::io::Cursor::new(png));
        let reader = decoder.read_info().unwrap();
        assert_eq!((reader.info().width, reader.info().height), (WIDTH, HEIGHT));
    }
}
