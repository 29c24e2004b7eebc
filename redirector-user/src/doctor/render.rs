//! The checks as a table for a terminal (the JSON output is their serde form).
use comfy_table::{ContentArrangement, Table};

use super::{Check, Status};

/// Width the table wraps its DETAIL column to: the table must not depend on the terminal (it
/// is often piped into a ticket or a log), and 100 columns read well everywhere.
const TABLE_WIDTH: u16 = 100;

/// The checks as a table with columns CHECK, STATUS and DETAIL. The DETAIL cell of a check that
/// did not pass ends with a `fix: ...` line when there is something to do. Ends with a newline,
/// ready for `print!`.
pub fn render_table(checks: &[Check]) -> String {
    let mut table = Table::new();
    table
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_width(TABLE_WIDTH)
        .set_header(["CHECK", "STATUS", "DETAIL"]);
    for check in checks {
        let mut detail = check.detail.clone();
        if check.status != Status::Pass
            && let Some(fix) = &check.fix
        {
            detail.push_str("\nfix: ");
            detail.push_str(fix);
        }
        table.add_row([check.name.to_owned(), check.status.to_string(), detail]);
    }
    let mut text = table.to_string();
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::{ATTACH_POINT, tests::check};

    #[test]
    fn table_has_header_rows_and_fixes_under_failures() {
        let table = render_table(&[
            check("privileges", Status::Pass, Some("never shown")),
            check("attach point", Status::Fail, Some("mkdir /x")),
            check("router address", Status::Warn, None),
        ]);
        let lines: Vec<&str> = table.lines().collect();
        let header = lines
            .iter()
            .position(|l| l.contains("CHECK"))
            .expect("header");
        assert!(
            lines[header].contains("STATUS") && lines[header].contains("DETAIL"),
            "{table}"
        );
        let failed = lines
            .iter()
            .position(|l| l.contains("attach point"))
            .expect("row");
        assert!(lines[failed].contains("FAIL"), "{table}");
        assert!(lines[failed + 1].contains("fix: mkdir /x"), "{table}");
        assert!(table.contains("PASS") && table.contains("WARN"), "{table}");
        assert!(!table.contains("never shown"), "{table}");
        assert!(
            lines
                .iter()
                .all(|l| l.chars().count() <= usize::from(TABLE_WIDTH)),
            "{table}"
        );
    }

    #[test]
    fn long_details_wrap_within_the_table() {
        let long = Check::fail(ATTACH_POINT, "word ".repeat(60), "fix it");
        let table = render_table(&[long]);
        assert!(
            table
                .lines()
                .all(|l| l.chars().count() <= usize::from(TABLE_WIDTH)),
            "{table}"
        );
    }
}
