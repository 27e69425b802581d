//! Stop strings on streamed text: text is released only once no stop string can begin in
//! it, and the text from a stop string on is never released (OpenAI's `stop`).

pub(crate) struct StopScan {
    stops: Vec<String>,
    held: String,
}

impl StopScan {
    pub(crate) fn new(stops: Vec<String>) -> Self {
        StopScan {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
        }
    }

    /// Adds `text`; returns what may be released, and whether a stop string was found (the
    /// text before it is released, the rest dropped).
    pub(crate) fn push(&mut self, text: &str) -> (String, bool) {
        self.held.push_str(text);
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(at) = first {
            let out = self.held[..at].to_string();
            self.held.clear();
            return (out, true);
        }
        // Hold back the longest end of the text that begins some stop string.
        let keep = self
            .held
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = &self.held[i..];
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(self.held.len());
        let out = self.held[..keep].to_string();
        self.held.drain(..keep);
        (out, false)
    }

    /// The text still held, at the end of generation.
    pub(crate) fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_back_prefixes_and_cuts_at_the_stop() {
        let mut s = StopScan::new(vec!["END".into(), "ünï".into()]);
        assert_eq!(s.push("abc E"), ("abc ".into(), false));
        assert_eq!(s.push("N"), ("".into(), false));
        assert_eq!(s.push("x"), ("ENx".into(), false));
        assert_eq!(s.push("yü"), ("y".into(), false));
        assert_eq!(s.push("nïz"), ("".into(), true));
        let mut s = StopScan::new(vec!["stop".into()]);
        assert_eq!(s.push("a sto"), ("a ".into(), false));
        assert_eq!(s.flush(), "sto");
        let mut none = StopScan::new(vec![]);
        assert_eq!(none.push("anything"), ("anything".into(), false));
    }
}
