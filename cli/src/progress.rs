//! Rendering the solver's events: `tty` (live lines per running step, as
//! buildx), `plain` (numbered steps, durations, CACHED marks), `rawjson`
//! (the event lines themselves).

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::time::{Duration, Instant};

use kiln_solver_protocol::Event;

/// `--progress` values.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `tty` on a terminal, else `plain`.
    Auto,
    /// Live, redrawn lines.
    Tty,
    /// Numbered lines, one per change.
    Plain,
    /// The solver's JSON events.
    Rawjson,
}

/// Where the renderer reads the time: the wall clock, or a fixed sequence
/// for golden tests.
pub trait Clock {
    /// Time since the build started.
    fn now(&self) -> Duration;
}

/// The wall clock, from when the renderer was made.
struct WallClock(Instant);

impl Clock for WallClock {
    fn now(&self) -> Duration {
        self.0.elapsed()
    }
}

#[derive(Default)]
struct Vertex {
    number: usize,
    name: String,
    /// When it started, since the build started.
    started: Option<Duration>,
    duration: Option<Duration>,
    cached: bool,
    failed: bool,
    /// Why it ran (`--explain`), as shown.
    why: Option<String>,
    tail: VecDeque<String>,
    partial: String,
}

/// Keeps per-step state and writes the chosen rendering.
pub struct Renderer {
    mode: Mode,
    vertices: HashMap<String, Vertex>,
    order: Vec<String>,
    clock: Box<dyn Clock>,
    /// Terminal width for `tty`; None asks the terminal.
    width: Option<usize>,
    drawn_lines: usize,
    last_draw: Option<Duration>,
    /// The solve has ended (its result or its error arrived).
    ended: bool,
}

const TAIL: usize = 6;

impl Renderer {
    /// A renderer; `Auto` picks by whether stderr is a terminal.
    pub fn new(mode: Mode) -> Renderer {
        let mode = match mode {
            Mode::Auto => {
                if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                    Mode::Tty
                } else {
                    Mode::Plain
                }
            }
            m => m,
        };
        Renderer::with_clock(mode, Box::new(WallClock(Instant::now())), None)
    }

    /// A renderer reading time from `clock` and, for `tty`, drawing `width`
    /// columns (None: the terminal's). `mode` must not be `Auto`.
    pub fn with_clock(mode: Mode, clock: Box<dyn Clock>, width: Option<usize>) -> Renderer {
        Renderer {
            mode,
            vertices: HashMap::new(),
            order: Vec::new(),
            clock,
            width,
            drawn_lines: 0,
            last_draw: None,
            ended: false,
        }
    }

    fn vertex(&mut self, digest: &str) -> &mut Vertex {
        if !self.vertices.contains_key(digest) {
            self.order.push(digest.to_string());
            let number = self.order.len();
            self.vertices.insert(
                digest.to_string(),
                Vertex {
                    number,
                    ..Default::default()
                },
            );
        }
        self.vertices.entry(digest.to_string()).or_default()
    }

    /// The last log lines of a step (for error messages).
    pub fn tail_of(&self, digest: &str) -> Vec<String> {
        self.vertices
            .get(digest)
            .map(|v| {
                let mut t: Vec<String> = v.tail.iter().cloned().collect();
                if !v.partial.is_empty() {
                    t.push(v.partial.clone());
                }
                t
            })
            .unwrap_or_default()
    }

    /// The resolved mode (never `Auto`).
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The name of a step.
    pub fn name_of(&self, digest: &str) -> Option<String> {
        self.vertices.get(digest).map(|v| v.name.clone())
    }

    /// Handles one event; `raw` is its JSON line.
    pub fn event(&mut self, ev: &Event, raw: &str, out: &mut dyn Write) {
        if self.mode == Mode::Rawjson {
            let _ = writeln!(out, "{raw}");
            return;
        }
        let plain = self.mode == Mode::Plain;
        if matches!(ev, Event::Result(_) | Event::Error { .. }) {
            self.ended = true;
        }
        match ev {
            Event::VertexStarted { digest, name, explain, .. } => {
                // Plain output numbers its steps; the live view names them.
                let why = explain
                    .as_ref()
                    .map(|e| match e.because_of.as_ref().and_then(|up| self.vertices.get(up)) {
                        Some(u) => {
                            let upstream = if plain {
                                format!("because of step #{}", u.number)
                            } else {
                                format!("because {} re-ran", u.name)
                            };
                            match e.besides_upstream() {
                                Some(rest) => format!("{upstream}; {rest}"),
                                None => upstream,
                            }
                        }
                        None => e.reason.clone(),
                    });
                let now = self.clock.now();
                let v = self.vertex(digest);
                v.name = name.clone();
                v.started = Some(now);
                v.why = why.clone();
                let n = v.number;
                if plain {
                    let _ = writeln!(out, "#{n} {name}");
                    if let Some(why) = why {
                        let _ = writeln!(out, "#{n} ran: {why}");
                    }
                }
            }
            Event::VertexCached { digest, name, .. } => {
                let v = self.vertex(digest);
                v.name = name.clone();
                v.cached = true;
                v.duration = Some(Duration::ZERO);
                let n = v.number;
                if plain {
                    let _ = writeln!(out, "#{n} {name}\n#{n} CACHED\n");
                }
            }
            Event::VertexCompleted { digest, duration_ms, .. } => {
                let v = self.vertex(digest);
                v.duration = Some(Duration::from_millis(*duration_ms));
                let n = v.number;
                if plain {
                    if !v.partial.is_empty() {
                        let p = std::mem::take(&mut v.partial);
                        let _ = writeln!(out, "#{n} {p}");
                    }
                    let _ = writeln!(out, "#{n} DONE {:.1}s\n", *duration_ms as f64 / 1000.0);
                }
            }
            Event::VertexFailed {
                digest,
                duration_ms,
                error,
                ..
            } => {
                let v = self.vertex(digest);
                v.duration = Some(Duration::from_millis(*duration_ms));
                v.failed = true;
                let n = v.number;
                if plain {
                    let _ = writeln!(out, "#{n} ERROR: {error}\n");
                }
            }
            Event::Log { digest, data, .. } => {
                let elapsed = self.clock.now();
                let v = self.vertex(digest);
                let n = v.number;
                let since = v.started.map(|s| elapsed.saturating_sub(s)).unwrap_or(elapsed);
                let mut text = std::mem::take(&mut v.partial);
                text.push_str(data);
                let mut lines: Vec<&str> = text.split('\n').collect();
                let rest = lines.pop().unwrap_or("").to_string();
                for l in &lines {
                    if plain {
                        let _ = writeln!(out, "#{n} {:.3} {l}", since.as_secs_f64());
                    }
                    v.tail.push_back(l.to_string());
                    if v.tail.len() > TAIL {
                        v.tail.pop_front();
                    }
                }
                v.partial = rest;
            }
            Event::Progress {
                id,
                done: true,
                current,
                total,
                digest,
            } if plain => match digest {
                Some(d) => {
                    let n = self.vertex(d).number;
                    let _ = writeln!(out, "#{n} {id} {current}/{total} done");
                }
                None => {
                    let _ = writeln!(out, "#{} {id} DONE", self.order.len() + 1);
                }
            },
            _ => {}
        }
        if self.mode == Mode::Tty {
            let now = self.clock.now();
            let due = self.last_draw.is_none_or(|t| now.saturating_sub(t) >= Duration::from_millis(80));
            let important = matches!(ev, Event::VertexFailed { .. } | Event::Result(_) | Event::Error { .. });
            if due || important {
                self.draw(out);
            }
        }
    }

    /// Redraws the live view (tty only), so timers move without events.
    pub fn tick(&mut self, out: &mut dyn Write) {
        if self.mode == Mode::Tty {
            self.draw(out);
        }
    }

    /// Redraws (tty) or finishes (plain) at the end.
    pub fn finish(&mut self, out: &mut dyn Write) {
        if self.mode == Mode::Tty {
            self.draw(out);
        }
    }

    fn draw(&mut self, out: &mut dyn Write) {
        let mut s = String::new();
        if self.drawn_lines > 0 {
            s.push_str(&format!("\x1b[{}A\x1b[J", self.drawn_lines));
        }
        let now = self.clock.now();
        let done = self.vertices.values().filter(|v| v.duration.is_some()).count();
        let mut lines = vec![format!(
            "[+] Building {:.1}s ({}/{}){}",
            now.as_secs_f64(),
            done,
            self.vertices.len(),
            // Every step seen so far may be done while later ones have not
            // started yet: only the solve's end finishes the build.
            if self.ended { " FINISHED" } else { "" }
        )];
        for d in &self.order {
            let Some(v) = self.vertices.get(d) else { continue };
            let status = if v.cached {
                "CACHED".to_string()
            } else if v.failed {
                format!("ERROR {:.1}s", v.duration.unwrap_or_default().as_secs_f64())
            } else if let Some(t) = v.duration {
                format!("{:.1}s", t.as_secs_f64())
            } else {
                format!("{:.1}s", v.started.map(|s| now.saturating_sub(s)).unwrap_or_default().as_secs_f64())
            };
            let name: String = v.name.chars().take(100).collect();
            lines.push(format!(" => {name:<60} {status}"));
            if let Some(why) = &v.why {
                lines.push(format!(" => => ran: {why}"));
            }
            if v.duration.is_none() || v.failed {
                for l in v.tail.iter() {
                    let l: String = l.chars().take(120).collect();
                    lines.push(format!(" => => # {l}"));
                }
            }
        }
        // Lines wider than the terminal would wrap and break the redraw.
        let width = self
            .width
            .or_else(|| terminal_size::terminal_size_of(std::io::stderr()).map(|(w, _)| w.0 as usize))
            .unwrap_or(120)
            .max(20);
        for l in &lines {
            let cut: String = l.chars().take(width - 1).collect();
            s.push_str(&cut);
            s.push('\n');
        }
        self.drawn_lines = lines.len();
        self.last_draw = Some(now);
        let _ = out.write_all(s.as_bytes());
        let _ = out.flush();
    }
}
