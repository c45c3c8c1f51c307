//! The rise/fall counter: pure hysteresis over check results, so a flapping server does not
//! flap the site.

/// One server's health as its results accumulate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counter {
    healthy: bool,
    /// A result has decided `healthy`: the first check, or `fall` failed requests before it.
    decided: bool,
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
            decided: false,
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
            decided: true,
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
            decided: true,
            against: if last == healthy { 0 } else { run },
            run,
            last: Some(last),
        }
    }

    pub fn healthy(&self) -> bool {
        self.healthy
    }

    /// Whether a result has decided the health (else it is healthy until its first check).
    pub fn decided(&self) -> bool {
        self.decided
    }

    /// For a server taken out: how many passing checks in a row it still needs to be back.
    pub fn passes_needed(&self, rise: u32) -> Option<u32> {
        (self.decided && !self.healthy).then(|| rise.max(1).saturating_sub(self.against))
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
        if !self.decided {
            self.decided = true;
            self.against = 0;
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

    /// Records a request the path to the server failed. It counts towards `fall` as a failed
    /// check does, but is never the first result that decides at once: a request that met a
    /// reset or a malformed answer as the proxy started, before the first check came back,
    /// took the server out, and with a single server the whole site, until `rise` checks
    /// brought it back. The first check still decides at once, unless `fall` failed requests
    /// came first (with `fall = 1`, one), which take the server out as failed checks would.
    pub fn record_failed_request(&mut self, rise: u32, fall: u32) -> Option<bool> {
        // Counted as after a first result; decided only if it flipped.
        let decided = std::mem::replace(&mut self.decided, true);
        let flipped = self.record(false, rise, fall);
        self.decided = decided || flipped.is_some();
        flipped
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

    /// Failed requests before the first check count towards `fall`, and do not decide at
    /// once; the first check still does.
    #[test]
    fn a_failed_request_before_the_first_check_does_not_decide() {
        let mut c = Counter::new();
        assert_eq!(c.record_failed_request(2, 3), None);
        assert!(c.healthy(), "one failed request took the server out");
        assert!(!c.decided());
        // The first check decides at once, whatever the requests said.
        assert_eq!(c.record(false, 2, 3), Some(false));
        let mut c = Counter::new();
        c.record_failed_request(2, 3);
        assert_eq!(c.record(true, 2, 3), None);
        // Decided, and the request's failure forgotten: `fall` more take it out.
        c.record_failed_request(2, 3);
        assert_eq!(c.record_failed_request(2, 3), None);
        assert_eq!(c.record_failed_request(2, 3), Some(false));
        // `fall` failed requests take it out before any check.
        let mut c = Counter::new();
        let flips: Vec<_> = (0..3).map(|_| c.record_failed_request(2, 3)).collect();
        assert_eq!(flips, [None, None, Some(false)]);
        // And then `rise` checks bring it back, as after any fall.
        assert_eq!(c.record(true, 2, 3), None);
        assert_eq!(c.record(true, 2, 3), Some(true));
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
