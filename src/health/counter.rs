//! The rise/fall counter: pure hysteresis over check results, so a flapping server does not
//! flap the site.

/// One server's health as its results accumulate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counter {
    healthy: bool,
    checked: bool,
    /// Consecutive results that disagree with `healthy`.
    against: u32,
    /// Consecutive identical results, for people to read.
    run: u32,
    last: Option<bool>,
}

impl Default for Counter {
    fn default() -> Self {
        Self::new()
    }
}

impl Counter {
    /// A server counts as healthy until its first check says otherwise.
    pub fn new() -> Counter {
        Counter {
            healthy: true,
            checked: false,
            against: 0,
            run: 0,
            last: None,
        }
    }

    /// A server whose health is already known (kept across a reload): the usual rise/fall
    /// applies from the first result.
    pub fn known(healthy: bool) -> Counter {
        Counter {
            healthy,
            checked: true,
            against: 0,
            run: 0,
            last: None,
        }
    }

    /// A server whose health is known and whose latest `run` results were `last` (`None`:
    /// not known, as `known`): the count goes on, and results that disagreed with `healthy`
    /// still count towards a flip. Those are the whole run, since a flip starts a run that
    /// agrees.
    pub fn resumed(healthy: bool, last: Option<bool>, run: u32) -> Counter {
        let Some(last) = last else {
            return Counter::known(healthy);
        };
        Counter {
            healthy,
            checked: true,
            against: if last == healthy { 0 } else { run },
            run,
            last: Some(last),
        }
    }

    pub fn healthy(&self) -> bool {
        self.healthy
    }

    /// How many of the latest results in a row were the same.
    pub fn run(&self) -> u32 {
        self.run
    }

    /// Records one result. Returns the new health when it flips: the very first result
    /// decides at once; after that `fall` failures in a row take a healthy server out and
    /// `rise` successes in a row bring it back.
    pub fn record(&mut self, ok: bool, rise: u32, fall: u32) -> Option<bool> {
        self.run = if self.last == Some(ok) {
            self.run.saturating_add(1)
        } else {
            1
        };
        self.last = Some(ok);
        if !self.checked {
            self.checked = true;
            let flipped = ok != self.healthy;
            self.healthy = ok;
            return flipped.then_some(ok);
        }
        if ok == self.healthy {
            self.against = 0;
            return None;
        }
        self.against += 1;
        let needed = if self.healthy { fall } else { rise };
        if self.against >= needed.max(1) {
            self.healthy = ok;
            self.against = 0;
            return Some(ok);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A counter rebuilt from what `ctl health` kept (health, latest result, run) behaves as
    /// the one it replaces, whatever the results before and after.
    #[test]
    fn a_resumed_counter_goes_on_as_the_one_it_replaces() {
        for before in ["", "+", "++-", "+--", "---", "---+", "--++", "-+-+-"] {
            for after in ["", "+", "-", "--", "++", "-+", "+-"] {
                let mut old = Counter::new();
                for r in before.chars() {
                    old.record(r == '+', 2, 3);
                }
                let mut new = if before.is_empty() {
                    Counter::new()
                } else {
                    Counter::resumed(old.healthy(), old.last, old.run())
                };
                for r in after.chars() {
                    let flipped = (old.record(r == '+', 2, 3), new.record(r == '+', 2, 3));
                    assert_eq!(flipped.0, flipped.1, "{before} then {after}");
                }
                assert_eq!(new, old, "{before} then {after}");
            }
        }
    }

    /// Feeds `results` ("+" success, "-" failure) and returns the health after each one,
    /// as "U"/"D", lower-case where it flipped.
    fn trace(results: &str, rise: u32, fall: u32) -> String {
        let mut c = Counter::new();
        results
            .chars()
            .map(|r| {
                let flipped = c.record(r == '+', rise, fall).is_some();
                match (c.healthy(), flipped) {
                    (true, false) => 'U',
                    (true, true) => 'u',
                    (false, false) => 'D',
                    (false, true) => 'd',
                }
            })
            .collect()
    }

    #[test]
    fn hysteresis() {
        // (results, rise, fall, expected trace)
        let table = [
            ("+++", 2, 3, "UUU"),
            ("-", 2, 3, "d"),             // the first check decides at once
            ("+--+---", 2, 3, "UUUUUUd"), // a success in between resets the fall count
            ("+---++", 2, 3, "UUUdDu"),
            ("+---+-++", 2, 3, "UUUdDDDu"), // a failure resets the rise count
            ("+-", 1, 1, "Ud"),
            ("-+", 1, 1, "du"),
            ("+-+-+-", 2, 2, "UUUUUU"), // flapping does not flap the health
        ];
        for (results, rise, fall, want) in table {
            assert_eq!(
                trace(results, rise, fall),
                want,
                "{results} rise={rise} fall={fall}"
            );
        }
    }

    #[test]
    fn run_counts_identical_results() {
        let mut c = Counter::new();
        for ok in [true, true, false, false, false] {
            c.record(ok, 2, 3);
        }
        assert_eq!(c.run(), 3);
    }
}
