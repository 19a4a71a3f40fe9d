//! Parses durations such as `90s`, `15m` or `2h` into seconds.

/// Why a duration could not be read.
#[derive(Debug, PartialEq, Eq)]
pub enum Error {
    Empty,
    BadNumber(String),
    BadUnit(char),
}

/// The duration in seconds.
pub fn seconds(text: &str) -> Result<u64, Error> {
    let unit = text.chars().last().ok_or(Error::Empty)?;
    let factor = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        other => return Err(Error::BadUnit(other)),
    };
    let number = &text[..text.len() - unit.len_utf8()];
    let value: u64 = number
        .parse()
        .map_err(|_| Error::BadNumber(number.to_owned()))?;
    Ok(value * factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_each_unit() {
        assert_eq!(seconds("90s"), Ok(90));
        assert_eq!(seconds("15m"), Ok(900));
        assert_eq!(seconds("2h"), Ok(7200));
    }

    #[test]
    fn refuses_what_it_cannot_read() {
        assert_eq!(seconds(""), Err(Error::Empty));
        assert_eq!(seconds("5d"), Err(Error::BadUnit('d')));
        assert_eq!(seconds("xs"), Err(Error::BadNumber("x".into())));
        assert_eq!(seconds("5é"), Err(Error::BadUnit('é')));
    }

    /// Deliberately slow, so that `cib run` shows a step in progress.
    #[test]
    fn a_slow_test() {
        std::thread::sleep(std::time::Duration::from_secs(3));
        assert_eq!(seconds("1h"), Ok(3600));
    }
}
