//! Gemma 4's object notation, the form of a tool call's arguments
//! (`call:get_weather{city:<|"|>Paris<|"|>,days:3}`), read into JSON.
//!
//! The notation, as the official chat template writes it and the models produce it:
//! strings are delimited by the `<|"|>` token (so anything may appear inside, markers
//! included); keys are bare and may contain spaces; numbers (with exponents), `true`,
//! `false`, `null`, `{}` and `[]` are bare. It is read from [`Piece`]s rather than text,
//! because the delimiter is a token id: a `<|"|>` spelled out in ordinary tokens is text.
//! transformers 5.23 parses the same notation for its response schema; the reading here is
//! tolerant where the models are sloppy (Python's `True`/`False`/`None`, a trailing comma,
//! a quoted key, a bare word as a string).

use serde_json::{Map, Number, Value};

/// One element of a tool call's body: text decoded from ordinary tokens, or the `<|"|>`
/// string delimiter token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Text(String),
    Quote,
}

/// A parse failure, with what was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotationError(pub String);

impl std::fmt::Display for NotationError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A character or the string delimiter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sym {
    Char(char),
    Quote,
}

/// Reads `call:NAME{...}` calls, one after another (separated by nothing, whitespace or
/// commas), into `(name, arguments)` pairs.
pub fn parse_calls(pieces: &[Piece]) -> Result<Vec<(String, Value)>, NotationError> {
    let mut r = Reader::new(pieces);
    let mut calls = Vec::new();
    loop {
        r.skip(|c| c.is_whitespace() || c == ',');
        if r.at_end() {
            return Ok(calls);
        }
        r.expect_word("call:")?;
        let name: String = r.take_while(|c| c != '{' && !c.is_whitespace());
        if name.is_empty() {
            return Err(NotationError("a tool call without a name".into()));
        }
        r.skip(char::is_whitespace);
        let args = if r.peek() == Some(Sym::Char('{')) {
            r.value()?
        } else {
            Value::Object(Map::new())
        };
        calls.push((name, args));
    }
}

/// Reads one value (an object, usually) from `pieces`.
pub fn parse_value(pieces: &[Piece]) -> Result<Value, NotationError> {
    let mut r = Reader::new(pieces);
    let v = r.value()?;
    r.skip(char::is_whitespace);
    if !r.at_end() {
        return Err(NotationError("text after the value".into()));
    }
    Ok(v)
}

struct Reader {
    syms: Vec<Sym>,
    at: usize,
}

impl Reader {
    fn new(pieces: &[Piece]) -> Self {
        let mut syms = Vec::new();
        for p in pieces {
            match p {
                Piece::Text(t) => syms.extend(t.chars().map(Sym::Char)),
                Piece::Quote => syms.push(Sym::Quote),
            }
        }
        Reader { syms, at: 0 }
    }

    fn at_end(&self) -> bool {
        self.at >= self.syms.len()
    }

    fn peek(&self) -> Option<Sym> {
        self.syms.get(self.at).copied()
    }

    fn skip(&mut self, f: impl Fn(char) -> bool) {
        while let Some(Sym::Char(c)) = self.peek() {
            if !f(c) {
                break;
            }
            self.at += 1;
        }
    }

    fn take_while(&mut self, f: impl Fn(char) -> bool) -> String {
        let mut s = String::new();
        while let Some(Sym::Char(c)) = self.peek() {
            if !f(c) {
                break;
            }
            s.push(c);
            self.at += 1;
        }
        s
    }

    fn expect_word(&mut self, word: &str) -> Result<(), NotationError> {
        for w in word.chars() {
            if self.peek() != Some(Sym::Char(w)) {
                return Err(NotationError(format!("expected `{word}`")));
            }
            self.at += 1;
        }
        Ok(())
    }

    fn expect(&mut self, c: char) -> Result<(), NotationError> {
        self.skip(char::is_whitespace);
        if self.peek() != Some(Sym::Char(c)) {
            return Err(NotationError(format!("expected `{c}`")));
        }
        self.at += 1;
        Ok(())
    }

    /// The text up to the closing delimiter (the opening one already read).
    fn string(&mut self) -> Result<String, NotationError> {
        let mut s = String::new();
        loop {
            match self.peek() {
                Some(Sym::Char(c)) => s.push(c),
                Some(Sym::Quote) => {
                    self.at += 1;
                    return Ok(s);
                }
                None => return Err(NotationError("a string without its closing <|\"|>".into())),
            }
            self.at += 1;
        }
    }

    fn value(&mut self) -> Result<Value, NotationError> {
        self.skip(char::is_whitespace);
        match self.peek() {
            None => Err(NotationError("expected a value".into())),
            Some(Sym::Quote) => {
                self.at += 1;
                Ok(Value::String(self.string()?))
            }
            Some(Sym::Char('{')) => {
                self.at += 1;
                let mut map = Map::new();
                loop {
                    self.skip(|c| c.is_whitespace() || c == ',');
                    match self.peek() {
                        Some(Sym::Char('}')) => {
                            self.at += 1;
                            return Ok(Value::Object(map));
                        }
                        None => return Err(NotationError("an object without its `}`".into())),
                        Some(Sym::Quote) => {
                            self.at += 1;
                            let key = self.string()?;
                            self.expect(':')?;
                            map.insert(key, self.value()?);
                        }
                        Some(Sym::Char(_)) => {
                            let key = self.take_while(|c| c != ':' && c != '}' && c != ',');
                            self.expect(':')?;
                            map.insert(key.trim().to_string(), self.value()?);
                        }
                    }
                }
            }
            Some(Sym::Char('[')) => {
                self.at += 1;
                let mut items = Vec::new();
                loop {
                    self.skip(|c| c.is_whitespace() || c == ',');
                    match self.peek() {
                        Some(Sym::Char(']')) => {
                            self.at += 1;
                            return Ok(Value::Array(items));
                        }
                        None => return Err(NotationError("an array without its `]`".into())),
                        _ => items.push(self.value()?),
                    }
                }
            }
            Some(Sym::Char(_)) => {
                let word = self.take_while(|c| !matches!(c, ',' | '}' | ']'));
                Ok(bare(word.trim()))
            }
        }
    }
}

/// A bare word: a number, a boolean, null, or else the word as a string.
fn bare(word: &str) -> Value {
    match word {
        "true" | "True" => return Value::Bool(true),
        "false" | "False" => return Value::Bool(false),
        "null" | "None" => return Value::Null,
        _ => {}
    }
    if let Ok(i) = word.parse::<i64>() {
        return Value::Number(i.into());
    }
    if let Ok(u) = word.parse::<u64>() {
        return Value::Number(u.into());
    }
    let numeric = word
        .chars()
        .all(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-'));
    if numeric {
        if let Some(n) = word.parse::<f64>().ok().and_then(Number::from_f64) {
            return Value::Number(n);
        }
    }
    Value::String(word.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Pieces from text where `"` stands for the delimiter token.
    fn p(s: &str) -> Vec<Piece> {
        let mut out = Vec::new();
        for (i, part) in s.split('"').enumerate() {
            if i > 0 {
                out.push(Piece::Quote);
            }
            if !part.is_empty() {
                out.push(Piece::Text(part.to_string()));
            }
        }
        out
    }

    #[test]
    fn reads_the_template_notation() {
        let calls = parse_calls(&p(
            r#"call:get_weather{city:"Paris",days:3,units:{temp:"C"},tags:["a","b"],ok:true,x:null,f:-1.5e3}"#,
        ))
        .unwrap();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].0, "get_weather");
        assert_eq!(
            calls[0].1,
            json!({"city":"Paris","days":3,"units":{"temp":"C"},"tags":["a","b"],"ok":true,"x":null,"f":-1500.0})
        );
    }

    #[test]
    fn strings_hold_anything_and_keys_may_have_spaces() {
        let v = parse_value(&p(r#"{full name:"a, b: {c} [d]",empty:""}"#)).unwrap();
        assert_eq!(v, json!({"full name":"a, b: {c} [d]","empty":""}));
        // Markers and quotes spelled out in text stay text inside a string.
        let pieces = vec![
            Piece::Text("{q:".into()),
            Piece::Quote,
            Piece::Text("<|\"|> <tool_call|>".into()),
            Piece::Quote,
            Piece::Text("}".into()),
        ];
        assert_eq!(
            parse_value(&pieces).unwrap(),
            json!({"q":"<|\"|> <tool_call|>"})
        );
    }

    #[test]
    fn several_calls_and_sloppy_forms() {
        let calls =
            parse_calls(&p(r#"call:a{x:1} call:b{},call:c{y:True,z:None,w:word,}"#)).unwrap();
        let names: Vec<_> = calls.iter().map(|c| c.0.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert_eq!(calls[2].1, json!({"y":true,"z":null,"w":"word"}));
        assert_eq!(parse_calls(&p("call:noargs")).unwrap()[0].1, json!({}));
        assert_eq!(
            parse_calls(&p(r#"call:k{"quoted key":1}"#)).unwrap()[0].1,
            json!({"quoted key":1})
        );
    }

    #[test]
    fn unfinished_input_is_an_error() {
        for s in [
            r#"call:a{x:"open"#,
            "call:a{x:1",
            "call:a{x:[1,2",
            "call:{x:1}",
            "nope",
        ] {
            assert!(parse_calls(&p(s)).is_err(), "{s}");
        }
    }
}
