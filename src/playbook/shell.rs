//! Where a template hole stands in a shell command, decided at load.
//!
//! A small POSIX `sh` lexer walks the command with its holes in place and gives each hole its
//! context: a bare word, inside the author's single quotes, inside double quotes, and whether
//! it starts a word (so a value could be an option) or follows a `/` (so a value could climb
//! out of a directory). Contexts where no quoting is safe (a here-document body, a comment,
//! backticks, `${…}`, `$((…))`, `$'…'`, the command name itself, or the arguments of a
//! program that runs its arguments as code) are refused with the fix. The lexer is
//! conservative: what it does not understand it refuses rather than guesses.
//!
//! bash evaluates some words a second time, as arithmetic, and runs a `$(…)` it finds in an
//! array subscript there, quoted or not (`let 'a[$(cmd)]'` runs cmd): `((…))`, `$[…]`,
//! `let`, `[[…]]`, `declare -i`, subscripts, `${a[…]}` and `${v:…}`. Holes there are refused;
//! in a command that has any of them, a value may reach them through a variable, so a value
//! with `$` or a backquote is refused at render ([`ShellHole::arithmetic`]).

/// How a hole's value is written into the command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quote {
    /// A bare word: the value becomes one single-quoted word.
    Word,
    /// Inside the author's `'…'`: each `'` in the value is written as `'\''`.
    Single,
    /// Inside the author's `"…"`: `\`, `"`, `$` and backquote are backslash-escaped.
    Double,
}

/// A hole's place in a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShellHole {
    /// Quoting of the value.
    pub quote: Quote,
    /// The hole starts a word before any `--`: a value starting with `-` would be an option.
    pub option_position: bool,
    /// The hole follows a `/` in its word: the value is part of a path.
    pub after_slash: bool,
    /// The command evaluates arithmetic somewhere (see the module's doc): a value with `$` or
    /// a backquote could run there through a variable set from it.
    pub arithmetic: bool,
}

/// Shells. No hole may stand in their arguments (`bash -c 'x'` runs x), and one among another
/// program's arguments (`kubectl exec pod -- sh -c '…'`) likely runs the words after it.
const SHELLS: &[&str] = &[
    "sh", "bash", "dash", "zsh", "ksh", "mksh", "ash", "busybox", "fish", "csh", "tcsh",
];

/// Other programs that run their arguments as code, as shells do (`trap` runs its first;
/// sed's `e` and awk's `system()` run commands from their scripts, which are arguments).
const INTERPRETERS: &[&str] = &[
    "eval", "source", ".", "su", "ssh", "trap", "sed", "awk", "gawk", "mawk", "nawk", "parallel",
    "watch",
];

/// Options whose argument is a program in the interpreter's language, by interpreter
/// (`python3 -c 'code'`); their other arguments are the program's own. A short option counts
/// at the end of a cluster (`perl -ne '…'`, `psql -Atc '…'`) and with its argument attached
/// (`python3 -c'…'`), a long one with `=` (`node --eval=…`).
const CODE_OPTIONS: &[(&str, &str)] = &[
    ("python", "-c"),
    ("python3", "-c"),
    ("perl", "-e"),
    ("perl", "-E"),
    ("ruby", "-e"),
    ("node", "-e"),
    ("node", "-p"),
    ("node", "--eval"),
    ("node", "--print"),
    ("php", "-r"),
    ("lua", "-e"),
];

/// The same for database clients, whose programs are queries: Reflex quotes for the shell,
/// not for SQL, so a quote in the value would end the query's string.
const QUERY_OPTIONS: &[(&str, &str)] = &[
    ("psql", "-c"),
    ("psql", "--command"),
    ("mysql", "-e"),
    ("mysql", "--execute"),
    ("mariadb", "-e"),
    ("mariadb", "--execute"),
    ("clickhouse-client", "-q"),
    ("clickhouse-client", "--query"),
    ("cqlsh", "-e"),
    ("cqlsh", "--execute"),
    ("mongosh", "--eval"),
    ("mongo", "--eval"),
];

/// The same for options whose argument is a command the program runs, through a shell or
/// split into words (`rsync -e 'ssh -p 2222'`, `flock /tmp/l -c '…'`, `git -c
/// core.sshCommand=…`, ssh's `-o ProxyCommand=…`).
const COMMAND_OPTIONS: &[(&str, &str)] = &[
    ("flock", "-c"),
    ("flock", "--command"),
    ("script", "-c"),
    ("script", "--command"),
    ("runuser", "-c"),
    ("runuser", "--command"),
    ("rsync", "-e"),
    ("rsync", "--rsh"),
    ("rsync", "--rsync-path"),
    ("scp", "-o"),
    ("scp", "-S"),
    ("sftp", "-o"),
    ("sftp", "-S"),
    ("tar", "-I"),
    ("tar", "--use-compress-program"),
    ("tar", "--to-command"),
    ("tar", "--checkpoint-action"),
    ("tar", "-F"),
    ("tar", "--info-script"),
    ("tar", "--new-volume-script"),
    ("git", "-c"),
    ("git", "--config-env"),
    ("git", "--upload-pack"),
    ("git", "--receive-pack"),
    ("git", "--exec"),
    ("tcpdump", "-z"),
    ("zip", "-TT"),
    ("zip", "--unzip-command"),
];

/// Whether a hole in `word` (its text so far), after the argument `last`, is the argument of
/// `option`: the next word after it, or attached to it. A short option may end a cluster of
/// others before the next word (`-ne`), or open its argument in its word (`-lne'…'`, which
/// any word of options holding the letter may be).
fn option_argument(option: &str, last: Option<&str>, word: &str) -> bool {
    if option.starts_with("--") {
        return last == Some(option)
            || word
                .strip_prefix(option)
                .is_some_and(|r| r.starts_with('='));
    }
    let letter = &option[1..];
    fn cluster(w: &str) -> Option<&str> {
        w.strip_prefix('-')
            .filter(|rest| !rest.starts_with('-') && !rest.is_empty())
    }
    last.and_then(cluster).is_some_and(|c| c.ends_with(letter))
        || cluster(word).is_some_and(|c| c.contains(letter))
}

/// Programs that run the command that follows their options (`sudo systemctl …`): the
/// command position moves past them.
const PREFIXES: &[&str] = &[
    "sudo", "doas", "env", "nohup", "nice", "ionice", "timeout", "exec", "command", "xargs",
    "time", "stdbuf", "setsid", "chrt", "taskset", "builtin", "coproc",
];

/// Programs that run the command after their `--` (`kubectl exec pod -- cmd`,
/// `nsenter -t 1 -m -- cmd`): the command position moves past it.
const RUNNERS: &[&str] = &[
    "kubectl",
    "oc",
    "nsenter",
    "unshare",
    "runuser",
    "setpriv",
    "systemd-run",
];

/// Whether `command`'s arguments so far end where the command it runs starts, for programs
/// that take it after arguments of their own without a `--` (`chroot /host cmd`, `docker exec
/// -u root app cmd`, `ip netns exec blue cmd`).
fn runs_after(command: &str, arguments: &[String]) -> bool {
    // The subcommand, the options that take an argument, then how many operands.
    let (sub, with_argument): (&[&str], &[&str]) = match command {
        "chroot" => (&[], &["--userspec", "--groups"]),
        "docker" | "podman" | "nerdctl" => (
            &["exec"],
            &[
                "-e",
                "--env",
                "--env-file",
                "-u",
                "--user",
                "-w",
                "--workdir",
                "--detach-keys",
            ],
        ),
        "ip" => (&["netns", "exec"], &[]),
        _ => return false,
    };
    if arguments.len() < sub.len() || arguments.iter().zip(sub).any(|(a, s)| a != s) {
        return false;
    }
    // The word just read is the one operand, after options and their arguments.
    let (mut operands, mut skip, mut last_is_operand) = (0, false, false);
    for a in &arguments[sub.len()..] {
        last_is_operand = false;
        if std::mem::take(&mut skip) {
            continue;
        }
        if a.starts_with('-') {
            skip = with_argument.contains(&a.as_str());
        } else {
            operands += 1;
            last_is_operand = true;
        }
    }
    operands == 1 && last_is_operand
}

/// Options of those prefixes that take an argument of their own (`sudo -u app cmd`): the word
/// after one is not the command.
const PREFIX_OPTIONS: &[(&str, &[&str])] = &[
    (
        "sudo",
        &[
            "-u",
            "-g",
            "-C",
            "-D",
            "-h",
            "-p",
            "-r",
            "-t",
            "-T",
            "-U",
            "--user",
            "--group",
            "--close-from",
            "--chdir",
            "--host",
            "--prompt",
            "--role",
            "--type",
            "--command-timeout",
            "--other-user",
        ],
    ),
    ("doas", &["-u", "-C"]),
    ("env", &["-u", "-C", "--unset", "--chdir"]),
    ("timeout", &["-s", "-k", "--signal", "--kill-after"]),
    (
        "stdbuf",
        &["-i", "-o", "-e", "--input", "--output", "--error"],
    ),
    ("exec", &["-a"]),
    (
        "xargs",
        &[
            "-I",
            "-d",
            "-E",
            "-L",
            "-n",
            "-P",
            "-s",
            "-a",
            "--delimiter",
            "--max-lines",
            "--max-args",
            "--max-procs",
            "--max-chars",
            "--arg-file",
            "--eof",
            "--replace",
        ],
    ),
    (
        "ionice",
        &["-c", "-n", "-p", "-P", "-u", "--class", "--classdata"],
    ),
    ("nice", &["-n", "--adjustment"]),
];

/// Commands that evaluate their arguments as bash arithmetic (`let`) or may (`[[ -gt ]]`).
const ARITHMETIC: &[&str] = &["let", "[["];

/// Commands whose `-i` option makes the variables they set integers: assignments to them
/// are evaluated as arithmetic.
const DECLARERS: &[&str] = &["declare", "typeset", "local", "export", "readonly"];

/// Commands whose arguments name variables (bash evaluates a subscript in a name as
/// arithmetic, and the value would choose the variable).
const NAMERS: &[&str] = &["read", "unset", "mapfile", "readarray", "getopts"];

/// Options whose argument names a variable, by command.
const NAME_OPTIONS: &[(&str, &str)] = &[
    ("printf", "-v"),
    ("test", "-v"),
    ("[", "-v"),
    ("wait", "-p"),
];

/// Words after which the next word is a command again.
const KEYWORDS: &[&str] = &[
    "if", "then", "else", "elif", "do", "while", "until", "!", "{",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InQuote {
    None,
    Single,
    Double,
    /// `$'…'`: bash's escapes make any quoting of ours unsound.
    Ansi,
}

/// A command, or the inside of `$(…)`.
#[derive(Debug)]
struct Normal {
    quote: InQuote,
    /// Literal text of the word being read (quotes removed); `None` between words.
    word: Option<String>,
    /// Whether a hole stands in the current word.
    word_has_hole: bool,
    /// The command name of the current simple command, once read.
    command: Option<String>,
    /// After a prefix (`sudo`, `env`, …): its options are skipped before the command.
    after_prefix: bool,
    /// The last prefix read, whose options are being skipped.
    prefix: Option<String>,
    /// The next word is the argument of the prefix's option before it (`-u app`).
    prefix_argument: bool,
    /// A `--` word was seen in this simple command: later words are not options.
    end_of_options: bool,
    /// The next word is the target of a redirection (`> file`), not an argument.
    redirect_target: bool,
    /// That redirection duplicates a descriptor (`>&`, `<&`): its target is a number, and
    /// bash expands any other word there a second time.
    dup_target: bool,
    /// The command is a declaration with `-i`: its arguments are arithmetic.
    integer_declaration: bool,
    /// The last argument word of the current simple command (for options that take a name).
    last_argument: Option<String>,
    /// The current simple command's arguments, as read.
    arguments: Vec<String>,
    /// The next word is a file or text for the command's stdin (`<`, `<<<`).
    input_target: bool,
    /// A hole stands in the current simple command.
    command_has_hole: bool,
    /// A hole stands in what the current simple command reads on stdin (`< {{ … }}`).
    into_stdin: bool,
    /// An earlier command of this pipeline had a hole: its value may reach this one's stdin.
    fed: bool,
    /// A command that runs its stdin as code was fed a value (see [`runs_stdin`]): why.
    refused: Option<String>,
    /// A shell among the current simple command's arguments.
    shell_argument: Option<String>,
    /// This frame's commands evaluate arithmetic somewhere (see the module's doc).
    arithmetic: bool,
    /// The next word is a here-document delimiter (`<<EOF`), `true` for `<<-`.
    heredoc_delim_next: Option<bool>,
    /// Here-documents whose bodies start at the next newline: (delimiter, strip tabs).
    heredocs: Vec<(String, bool)>,
    /// Inside a comment, until the newline.
    comment: bool,
    /// Inside `$(…)` (a `)` ends it) rather than the top level.
    subst: bool,
    /// Open `(` inside this frame, so that `)` of a subshell does not end a `$(`.
    parens: usize,
}

impl Normal {
    /// `<` or `>`: the next word is a redirection's target, or (`<<`) a here-document's
    /// delimiter, or (`<<<`) a here-string's data.
    fn redirection(&mut self, c: char, prev: Option<char>) {
        self.end_word();
        self.input_target = c == '<';
        if c == '<' && self.heredoc_delim_next.is_some() {
            // `<<<`: a here-string; its word is data on stdin.
            self.heredoc_delim_next = None;
            self.redirect_target = true;
        } else if c == '<' && prev == Some('<') {
            self.redirect_target = false;
            self.heredoc_delim_next = Some(false);
        } else {
            self.redirect_target = true;
        }
    }

    fn new(subst: bool) -> Self {
        Normal {
            quote: InQuote::None,
            word: None,
            word_has_hole: false,
            command: None,
            after_prefix: false,
            prefix: None,
            prefix_argument: false,
            end_of_options: false,
            redirect_target: false,
            dup_target: false,
            integer_declaration: false,
            last_argument: None,
            arguments: Vec::new(),
            input_target: false,
            command_has_hole: false,
            into_stdin: false,
            fed: false,
            refused: None,
            shell_argument: None,
            arithmetic: false,
            heredoc_delim_next: None,
            heredocs: Vec::new(),
            comment: false,
            subst,
            parens: 0,
        }
    }

    fn push_char(&mut self, c: char) {
        self.word.get_or_insert_with(String::new).push(c);
    }

    /// A word ended: update the simple command it belongs to.
    fn end_word(&mut self) {
        let Some(word) = self.word.take() else {
            return;
        };
        let had_hole = std::mem::take(&mut self.word_has_hole);
        if let Some(strip) = self.heredoc_delim_next.take() {
            self.heredocs.push((word, strip));
            return;
        }
        if std::mem::take(&mut self.redirect_target) {
            self.dup_target = false;
            self.input_target = false;
            return;
        }
        if is_subscript_assignment(&word) {
            self.arithmetic = true;
        }
        if self.command.is_none() {
            if is_assignment(&word) || KEYWORDS.contains(&word.as_str()) {
                return;
            }
            if std::mem::take(&mut self.prefix_argument) {
                return;
            }
            if self.after_prefix
                && (word.starts_with('-')
                    || word.contains('=')
                    || word.starts_with(|c: char| c.is_ascii_digit()))
            {
                self.prefix_argument = (PREFIX_OPTIONS.iter()).any(|(p, options)| {
                    self.prefix.as_deref() == Some(*p) && options.contains(&word.as_str())
                });
                return;
            }
            let name = basename(&word).to_string();
            if PREFIXES.contains(&name.as_str()) && !had_hole {
                self.after_prefix = true;
                self.prefix = Some(name);
                return;
            }
            if ARITHMETIC.contains(&name.as_str()) {
                self.arithmetic = true;
            }
            self.command = Some(name);
            return;
        }
        if word == "--" && !self.end_of_options {
            if (self.command.as_deref()).is_some_and(|c| RUNNERS.contains(&c)) {
                self.run_next();
                return;
            }
            self.end_of_options = true;
        }
        if SHELLS.contains(&basename(&word)) {
            self.shell_argument = Some(basename(&word).to_string());
        }
        if word.starts_with('-')
            && word.contains('i')
            && !self.end_of_options
            && self
                .command
                .as_deref()
                .is_some_and(|c| DECLARERS.contains(&c))
        {
            self.integer_declaration = true;
            self.arithmetic = true;
        }
        self.arguments.push(word.clone());
        self.last_argument = Some(word);
        if (self.command.as_deref()).is_some_and(|c| runs_after(c, &self.arguments)) {
            self.run_next();
        }
    }

    /// The command this one runs starts with the next word, reading this one's stdin.
    fn run_next(&mut self) {
        let fed = self.fed || self.into_stdin;
        self.end_command();
        self.fed = fed;
    }

    /// A command separator (`;`, `&`, `|`, newline, `(`): a new simple command starts.
    fn end_command(&mut self) {
        self.end_word();
        // `xargs` is a prefix: the command it runs is read as this command's name.
        let command = match self.prefix.as_deref() {
            Some(xargs @ "xargs") => Some(xargs),
            _ => self.command.as_deref(),
        };
        if let Some(command) = command
            && (self.fed || self.into_stdin)
            && (command == "xargs" || runs_stdin(command, &self.arguments))
            && self.refused.is_none()
        {
            self.refused = Some(format!(
                "a value reaches the stdin of `{command}` (piped from a command with a hole, \
                 or redirected from one), and `{command}` runs what it reads as {}: the value \
                 would become a command. Pass the value as an argument of a command spelled \
                 out instead",
                if matches!(command, "xargs" | "parallel") {
                    "arguments of a command"
                } else {
                    "code"
                }
            ));
        }
        self.arguments.clear();
        self.command_has_hole = false;
        self.into_stdin = false;
        self.input_target = false;
        self.fed = false;
        self.command = None;
        self.after_prefix = false;
        self.prefix = None;
        self.prefix_argument = false;
        self.end_of_options = false;
        self.redirect_target = false;
        self.dup_target = false;
        self.integer_declaration = false;
        self.last_argument = None;
        self.shell_argument = None;
    }
}

/// Whether `command` with these arguments reads a program (or, for `xargs`, commands'
/// arguments) from its stdin: a shell or an interpreter given no program of its own (`sh`,
/// `bash -s`, `python3 -`), a database client given no query (`psql -d app`), `xargs`.
fn runs_stdin(command: &str, arguments: &[String]) -> bool {
    let operand = |a: &String| !a.starts_with('-');
    if SHELLS.contains(&command)
        || ["python", "python3", "perl", "ruby", "node", "php", "lua"].contains(&command)
    {
        return arguments.iter().any(|a| a == "-s" || a == "-") || !arguments.iter().any(operand);
    }
    if command == "sqlite3" {
        // `sqlite3 app.db "SQL"` takes its query as its second operand.
        return arguments.iter().filter(|a| operand(a)).count() < 2;
    }
    let queries: Vec<&str> = (QUERY_OPTIONS.iter())
        .filter(|(c, _)| *c == command)
        .map(|(_, o)| *o)
        .collect();
    if !queries.is_empty() {
        // A query given by an option (or a file) is not read from stdin.
        let given = |o: &&str| {
            (arguments.iter())
                .any(|a| option_argument(o, Some(a), "") || option_argument(o, None, a))
        };
        return !queries.iter().chain(&["-f", "--file"]).any(given);
    }
    matches!(command, "xargs" | "parallel")
}

fn is_assignment(word: &str) -> bool {
    match word.split_once('=') {
        Some((name, _)) => crate::alert::is_label_name(name),
        None => false,
    }
}

/// `name[…]=…`: bash evaluates an indexed array's subscript as arithmetic.
fn is_subscript_assignment(word: &str) -> bool {
    match word.split_once('[') {
        Some((name, rest)) => crate::alert::is_label_name(name) && rest.contains("]="),
        None => false,
    }
}

fn basename(word: &str) -> &str {
    word.rsplit('/').next().unwrap_or(word)
}

#[derive(Debug)]
enum Frame {
    Normal(Box<Normal>),
    /// `` `…` ``.
    Backtick,
    /// `${…}`, with its open braces.
    Brace(usize),
    /// `$((…))` or `((…))`, with its open parentheses.
    Arith(usize),
    /// `$[…]` (bash's old arithmetic), with its open brackets.
    Bracket(usize),
}

/// Here-document body being read.
#[derive(Debug)]
struct Body {
    delim: String,
    strip_tabs: bool,
    line: String,
}

/// The lexer; feed it the template's literal text and holes in order.
#[derive(Debug)]
pub struct Lexer {
    frames: Vec<Frame>,
    body: Option<Body>,
    /// A backslash escapes the next character.
    escaped: bool,
    /// The previous literal character (for two-character operators).
    prev: Option<char>,
    /// Arithmetic was seen (in a frame since closed, or in `$((`, `$[`, `${…}`).
    arithmetic: bool,
    /// A here-document body had `$(`, `${` or a backquote: a shell may read a substitution
    /// there past the delimiter's line (dash does), so where the command goes on is unsure.
    body_substitution: bool,
}

impl Default for Lexer {
    fn default() -> Self {
        Self::new()
    }
}

impl Lexer {
    /// A lexer at the start of a command.
    pub fn new() -> Self {
        Lexer {
            frames: vec![Frame::Normal(Box::new(Normal::new(false)))],
            body: None,
            escaped: false,
            prev: None,
            arithmetic: false,
            body_substitution: false,
        }
    }

    /// Whether the command evaluates arithmetic somewhere, as far as read (see the module's
    /// doc): then a value may reach it through a variable.
    pub fn arithmetic(&self) -> bool {
        self.arithmetic
            || (self.frames.iter()).any(|f| {
                matches!(f, Frame::Normal(n) if n.arithmetic
                    || n.word.as_deref().is_some_and(is_subscript_assignment))
            })
    }

    fn top(&mut self) -> &mut Frame {
        self.frames
            .last_mut()
            .expect("the outer frame is never popped")
    }

    /// Feeds literal text.
    pub fn text(&mut self, s: &str) {
        for c in s.chars() {
            let escaped = self.escaped;
            self.char(c);
            // An escaped character starts no operator (`\$(` is not a substitution).
            self.prev = (!escaped).then_some(c);
        }
    }

    fn char(&mut self, c: char) {
        if let Some(body) = &mut self.body {
            if c == '\n' {
                let line = std::mem::take(&mut body.line);
                let line = if body.strip_tabs {
                    line.trim_start_matches('\t')
                } else {
                    &line
                };
                if line == body.delim {
                    self.body = None;
                    self.next_heredoc();
                }
            } else {
                if c == '`' || (matches!(c, '(' | '{') && body.line.ends_with('$')) {
                    self.body_substitution = true;
                }
                body.line.push(c);
            }
            return;
        }
        if std::mem::take(&mut self.escaped) {
            if let Frame::Normal(n) = self.top() {
                // `\<newline>` joins lines; anything else is that character, literally.
                if c != '\n' {
                    n.push_char(c);
                }
            }
            return;
        }
        let prev = self.prev;
        match self.top() {
            Frame::Backtick => match c {
                '\\' => self.escaped = true,
                '`' => {
                    self.frames.pop();
                }
                _ => {}
            },
            Frame::Brace(_) | Frame::Arith(_) | Frame::Bracket(_) => self.counted_char(c),
            Frame::Normal(_) => self.normal_char(c, prev),
        }
    }

    /// Inside `${…}`, `$((…))` or `$[…]`: only the nesting matters (holes are refused
    /// there), and whether a `${…}` has a subscript or an offset (arithmetic).
    fn counted_char(&mut self, c: char) {
        if matches!(self.top(), Frame::Brace(_)) && matches!(c, '[' | ':') {
            self.arithmetic = true;
        }
        let (depth, open, close) = match self.top() {
            Frame::Brace(d) => (d, '{', '}'),
            Frame::Arith(d) => (d, '(', ')'),
            Frame::Bracket(d) => (d, '[', ']'),
            _ => return,
        };
        if c == open {
            *depth += 1;
        } else if c == close {
            *depth -= 1;
            if *depth == 0 {
                self.frames.pop();
                if let Frame::Normal(outer) = self.top() {
                    outer.push_char(close);
                }
            }
        }
    }

    /// A character of a comment or inside quotes; false when it is neither.
    fn quoted_char(&mut self, c: char, prev: Option<char>) -> bool {
        let Frame::Normal(n) = self.top() else {
            return false;
        };
        if n.comment {
            if c == '\n' {
                n.comment = false;
                self.newline();
            }
            return true;
        }
        match n.quote {
            InQuote::Single if c == '\'' => n.quote = InQuote::None,
            InQuote::Single => n.push_char(c),
            InQuote::Ansi => match c {
                '\\' => self.escaped = true,
                '\'' => n.quote = InQuote::None,
                _ => n.push_char(c),
            },
            InQuote::Double => match c {
                '"' => n.quote = InQuote::None,
                '\\' => self.escaped = true,
                '`' => self.frames.push(Frame::Backtick),
                '(' if prev == Some('$') => {
                    self.frames.push(Frame::Normal(Box::new(Normal::new(true))))
                }
                '{' if prev == Some('$') => self.frames.push(Frame::Brace(1)),
                '[' if prev == Some('$') => self.open_bracket(),
                _ => n.push_char(c),
            },
            InQuote::None => return false,
        }
        true
    }

    fn normal_char(&mut self, c: char, prev: Option<char>) {
        if self.quoted_char(c, prev) {
            return;
        }
        let Frame::Normal(n) = self.top() else {
            return;
        };
        match c {
            '\'' if prev == Some('$') && n.word.as_deref().is_some_and(|w| w.ends_with('$')) => {
                n.quote = InQuote::Ansi;
            }
            '\'' => {
                n.word.get_or_insert_with(String::new);
                n.quote = InQuote::Single;
            }
            '"' => {
                n.word.get_or_insert_with(String::new);
                n.quote = InQuote::Double;
            }
            '\\' => self.escaped = true,
            '`' => {
                n.push_char('`');
                self.frames.push(Frame::Backtick);
            }
            '#' if n.word.is_none() => n.comment = true,
            '(' if prev == Some('$') => {
                self.frames.push(Frame::Normal(Box::new(Normal::new(true))))
            }
            '{' if prev == Some('$') => self.frames.push(Frame::Brace(1)),
            '[' if prev == Some('$') => self.open_bracket(),
            // `((`: bash's arithmetic command (dash's two subshells; refused either way).
            '(' if prev == Some('(') && n.parens > 0 => {
                n.parens -= 1;
                self.arithmetic = true;
                self.frames.push(Frame::Arith(2));
            }
            '(' => {
                n.parens += 1;
                n.end_command();
            }
            ')' if n.subst && n.parens == 0 => {
                n.end_command();
                let refused = n.refused.take();
                // Arithmetic inside `$(…)` reads the command's variables as well.
                self.arithmetic |= n.arithmetic;
                self.frames.pop();
                if let Frame::Normal(outer) = self.top() {
                    outer.push_char(')');
                    outer.refused = outer.refused.take().or(refused);
                }
            }
            ')' => {
                n.parens = n.parens.saturating_sub(1);
                n.end_command();
            }
            // `2>&1`, `>|`: part of a redirection, not a separator.
            '&' if matches!(prev, Some('<' | '>')) => n.dup_target = true,
            '|' if prev == Some('>') => {}
            // `||`: the first `|` was taken for a pipe.
            '|' if prev == Some('|') => n.fed = false,
            // `|&`: a pipe of stdout and stderr.
            '&' if prev == Some('|') => {}
            '|' => {
                // What a command with a hole writes may carry the value on, through filters.
                let feeds = n.command_has_hole || n.fed;
                n.end_command();
                n.fed = feeds;
            }
            ';' | '&' => n.end_command(),
            '\n' => {
                n.end_command();
                self.newline();
            }
            '<' | '>' => n.redirection(c, prev),
            '-' if prev == Some('<') && n.heredoc_delim_next.is_some() && n.word.is_none() => {
                n.heredoc_delim_next = Some(true);
            }
            c if c.is_whitespace() => n.end_word(),
            c => n.push_char(c),
        }
        // `$((`: the `$(` frame the previous character opened is arithmetic.
        if c == '(' && prev == Some('(') && self.opened_arithmetic() {
            self.frames.pop();
            self.arithmetic = true;
            self.frames.push(Frame::Arith(2));
        }
    }

    fn open_bracket(&mut self) {
        self.arithmetic = true;
        self.frames.push(Frame::Bracket(1));
    }

    /// Whether the top frame is a `$(` opened by the character before a `(`: `$((`.
    fn opened_arithmetic(&self) -> bool {
        matches!(self.frames.last(), Some(Frame::Normal(inner))
            if inner.subst && inner.parens == 1 && inner.word.is_none())
    }

    fn newline(&mut self) {
        self.next_heredoc();
    }

    fn next_heredoc(&mut self) {
        if let Some(Frame::Normal(n)) = self.frames.last_mut()
            && !n.heredocs.is_empty()
        {
            let (delim, strip_tabs) = n.heredocs.remove(0);
            self.body = Some(Body {
                delim,
                strip_tabs,
                line: String::new(),
            });
        }
    }

    /// A hole here: its context, or why no quoting makes it safe (with the fix).
    pub fn hole(&mut self) -> Result<ShellHole, String> {
        if self.body.is_some() {
            return Err(
                "a hole in a here-document body: a value could end the document and \
                 run what follows. Pass the value as an argument instead, e.g. \
                 `printf '%s\\n' {{ … }} | command`"
                    .into(),
            );
        }
        if self.escaped {
            return Err("a hole right after a backslash: remove the backslash".into());
        }
        if self.body_substitution {
            return Err(
                "a hole after a here-document whose body has `$(`, `${` or a backquote: \
                 shells differ on where such a body ends (dash reads the substitution past \
                 the delimiter). Put the hole before the here-document, or take the \
                 substitution out of its body"
                    .into(),
            );
        }
        let after_dollar = self.prev == Some('$');
        let frame = self.top();
        let n = match frame {
            Frame::Backtick => {
                return Err(
                    "a hole inside backquotes: write the substitution as `$(…)` instead".into(),
                );
            }
            Frame::Brace(_) => {
                return Err(
                    "a hole inside `${…}`: assign the value to a variable first \
                     (`v={{ … }}; … ${v…}`)"
                        .into(),
                );
            }
            Frame::Arith(_) | Frame::Bracket(_) => {
                return Err(
                    "a hole inside `$((…))`, `((…))` or `$[…]` would be evaluated as \
                     arithmetic code: compute the number in the template instead \
                     (`{{ int(labels.x) + 1 }}`)"
                        .into(),
                );
            }
            Frame::Normal(n) => n,
        };
        if n.comment {
            return Err(
                "a hole in a shell comment: a newline in the value would end the comment. \
                 Remove the hole from the comment"
                    .into(),
            );
        }
        if n.heredoc_delim_next.is_some() {
            return Err("a hole as a here-document delimiter: spell the delimiter out".into());
        }
        if after_dollar {
            return Err(
                "a hole right after `$`: the value would be read as a variable's name or a \
                 substitution (`$(…)`). Write the variable out in full, or put a character \
                 between them"
                    .into(),
            );
        }
        let quote = match n.quote {
            InQuote::None => Quote::Word,
            InQuote::Single => Quote::Single,
            InQuote::Double => Quote::Double,
            InQuote::Ansi => {
                return Err("a hole inside `$'…'`: use '…' or \"…\" around it instead".into());
            }
        };
        if n.redirect_target && n.dup_target {
            return Err(
                "a hole after `>&` or `<&`: that target is a descriptor number, and bash \
                 expands any other word there a second time (`>&'$(…)'` runs the `$(…)`). \
                 Redirect to the file with `> {{ … }} 2>&1` instead"
                    .into(),
            );
        }
        let word = n.word.clone().unwrap_or_default();
        let starts_word = word.is_empty() && !n.word_has_hole;
        if n.command.is_none()
            && !n.redirect_target
            && !is_assignment(&word)
            && !(n.after_prefix
                && (n.prefix_argument || word.starts_with('-') || word.contains('=')))
        {
            return Err(
                "a hole as the command name: the alert would choose the command to \
                 run. Spell the command out and pass the value as an argument"
                    .into(),
            );
        }
        if let Some(cmd) = n.command.as_deref().filter(|c| ARITHMETIC.contains(c)) {
            return Err(format!(
                "a hole in the arguments of `{cmd}`, which bash evaluates as arithmetic: a \
                 `$(…)` in an array subscript of the value would run. Compare with `test`: \
                 `[ {{{{ int(labels.x) }}}} -gt 90 ]`"
            ));
        }
        let command = n.command.as_deref().unwrap_or_default();
        if command != "[" && command != "[[" && command.contains(['$', '`', '*', '?', '[', '{']) {
            return Err(format!(
                "a hole in the arguments of `{command}`, a command name the shell expands \
                 (a variable, a substitution or a pattern): Reflex cannot tell whether that \
                 command runs its arguments as code. Spell the command's name out"
            ));
        }
        let names = NAMERS.contains(&command)
            || (DECLARERS.contains(&command) && !word.contains('='))
            || (NAME_OPTIONS.iter()).any(|&(c, o)| {
                c == command
                    && !n.end_of_options
                    && option_argument(o, n.last_argument.as_deref(), &word)
            });
        if names && !n.redirect_target {
            return Err(format!(
                "a hole where `{command}` takes a variable's name: the value would choose the \
                 variable, and bash evaluates a subscript in it as arithmetic (a `$(…)` there \
                 would run). Spell the name out, and pass the value as a value (`v={{{{ … }}}}`)"
            ));
        }
        let takes = |&&(c, o): &&(&str, &str)| {
            c == command
                && !n.end_of_options
                && option_argument(o, n.last_argument.as_deref(), &word)
        };
        if let Some((cmd, option)) = CODE_OPTIONS.iter().find(takes) {
            return Err(format!(
                "a hole in the program `{cmd} {option}` runs: the value would be code. Pass it \
                 as an argument after the program (`{cmd} {option} '…' {{{{ … }}}}`) and read it \
                 there"
            ));
        }
        if let Some((cmd, option)) = COMMAND_OPTIONS.iter().find(takes) {
            return Err(format!(
                "a hole in the command `{cmd} {option}` runs: the alert would choose what \
                 runs. Spell the command out"
            ));
        }
        if let Some((cmd, option)) = QUERY_OPTIONS.iter().find(takes) {
            let fix = if *cmd == "psql" {
                "Pass it as a variable, which psql quotes, with the query on stdin: \
                 `psql -v v={{ … }} <<'SQL'`, then `… WHERE name = :'v'` and `SQL`"
            } else {
                "Reflex cannot quote a value for it: keep holes out of the query, or run a \
                 script that passes the value to the database as a query parameter"
            };
            return Err(format!(
                "a hole in the query of `{cmd} {option}`: the value would be part of the query (a \
                 quote in it ends a string there). {fix}"
            ));
        }
        if n.integer_declaration {
            return Err(
                "a hole in a declaration with `-i`, which bash evaluates as arithmetic: a \
                 `$(…)` in an array subscript of the value would run. Declare without `-i`"
                    .into(),
            );
        }
        if matches!(
            n.last_argument.as_deref(),
            Some("-exec" | "-execdir" | "-ok" | "-okdir")
        ) && starts_word
        {
            return Err(
                "a hole as the command `find -exec` runs: the alert would choose the command. \
                 Spell the command out and pass the value as its argument"
                    .into(),
            );
        }
        if let Some(shell) = &n.shell_argument {
            return Err(format!(
                "a hole after `{shell}` in the arguments of `{}`, which likely runs them as shell \
                 code (`kubectl exec pod -- sh -c '…'`). Pass the value another way (an \
                 environment variable, a file), or call the command directly",
                n.command.as_deref().unwrap_or_default()
            ));
        }
        if let Some(cmd) =
            (n.command.as_deref()).filter(|c| SHELLS.contains(c) || INTERPRETERS.contains(c))
        {
            return Err(format!(
                "a hole in the arguments of `{cmd}`, which runs them as code: a value from the \
                 alert would become a command. Call the commands directly with the value as an \
                 argument"
            ));
        }
        let hole = ShellHole {
            quote,
            option_position: starts_word && !n.end_of_options && !n.redirect_target,
            after_slash: word.ends_with('/'),
            arithmetic: false,
        };
        n.word.get_or_insert_with(String::new);
        n.word_has_hole = true;
        n.command_has_hole = true;
        n.into_stdin |= n.redirect_target && n.input_target;
        self.prev = None;
        Ok(hole)
    }

    /// The command is complete: quotes and substitutions must be closed.
    pub fn finish(mut self) -> Result<(), String> {
        if self.body.is_some() {
            self.char('\n');
            if let Some(b) = &self.body {
                return Err(format!(
                    "here-document is not closed (no line `{}`)",
                    b.delim
                ));
            }
        }
        if let [Frame::Normal(n)] = self.frames.as_mut_slice()
            && n.quote == InQuote::None
        {
            n.end_command();
            if let Some(why) = n.refused.take() {
                return Err(why);
            }
        }
        match self.frames.as_slice() {
            [Frame::Normal(n)] => match n.quote {
                InQuote::None => Ok(()),
                InQuote::Single | InQuote::Ansi => Err("unterminated `'` quote".into()),
                InQuote::Double => Err("unterminated `\"` quote".into()),
            },
            [.., Frame::Backtick] => Err("unterminated backquote".into()),
            _ => Err("unterminated `$(`, `${` or `$((`".into()),
        }
    }
}

/// Writes a value into a command in its context.
pub fn quote(value: &str, hole: &ShellHole) -> String {
    match hole.quote {
        Quote::Word => format!("'{}'", value.replace('\'', r"'\''")),
        Quote::Single => value.replace('\'', r"'\''"),
        Quote::Double => {
            let mut out = String::with_capacity(value.len() + 2);
            for c in value.chars() {
                if matches!(c, '\\' | '"' | '$' | '`') {
                    out.push('\\');
                }
                out.push(c);
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lexes `src` where `@` stands for a hole, up to its end; the lexer and the contexts of
    /// its holes, or the first error.
    fn lex(src: &str) -> Result<(Lexer, Vec<ShellHole>), String> {
        let mut lx = Lexer::new();
        let mut out = Vec::new();
        let mut parts = src.split('@').peekable();
        while let Some(text) = parts.next() {
            lx.text(text);
            if parts.peek().is_some() {
                out.push(lx.hole()?);
            }
        }
        Ok((lx, out))
    }

    /// The contexts of the holes of `src` (`@` for holes), or the first error.
    fn holes(src: &str) -> Result<Vec<ShellHole>, String> {
        let (lx, out) = lex(src)?;
        lx.finish()?;
        Ok(out)
    }

    fn one(src: &str) -> ShellHole {
        let h = holes(src).unwrap_or_else(|e| panic!("{src}: {e}"));
        assert_eq!(h.len(), 1, "{src}");
        h[0]
    }

    #[test]
    fn quoting_follows_the_authors_quotes() {
        assert_eq!(one("df -P @").quote, Quote::Word);
        assert_eq!(one("grep -c '@' f").quote, Quote::Single);
        assert_eq!(one("logger \"x @ y\"").quote, Quote::Double);
        assert_eq!(one("echo \"$(printf %s @)\"").quote, Quote::Word);
        assert_eq!(one("echo \"a $(echo \"b @\")\"").quote, Quote::Double);
        assert_eq!(one("X=@ ls").quote, Quote::Word);
    }

    #[test]
    fn options_and_paths_are_known() {
        assert!(one("ls @").option_position);
        assert!(one("ls '@'").option_position);
        assert!(!one("ls -- @").option_position);
        assert!(!one("ls x@").option_position);
        assert!(one("rm -rf cache/@").after_slash);
        assert!(one("rm -rf \"cache/@\"").after_slash);
        assert!(!one("ls @").after_slash);
        let two = holes("echo @ -- @").unwrap();
        assert!(two[0].option_position && !two[1].option_position);
        assert!(one("ls; ls @").option_position, "`--` is per command");
        assert!(!one("echo > @").option_position, "a redirection target");
    }

    #[test]
    fn unsafe_contexts_are_refused_with_a_fix() {
        for (src, needle) in [
            ("cat <<EOF\n@\nEOF\n", "here-document"),
            ("cat <<-'EOF'\n\tx @\n\tEOF\n", "here-document"),
            ("ls # @", "comment"),
            ("echo `ls @`", "backquotes"),
            ("echo ${X:-@}", "${"),
            ("echo $((@ + 1))", "arithmetic"),
            ("echo $'@'", "$'"),
            ("@ --force", "command name"),
            ("X=1 @", "command name"),
            ("ls | @", "command name"),
            ("sudo @", "command name"),
            ("if @; then ls; fi", "command name"),
            ("bash -c '@'", "`bash`"),
            ("eval \"echo @\"", "`eval`"),
            ("sudo sh -c @", "`sh`"),
            ("ssh host @", "`ssh`"),
            // bash expands a `>&` target twice: `>&'$(…)'` runs it (found by the fuzz test).
            ("cmd >&@", "`>&`"),
            ("cmd >& '@'", "`>&`"),
            ("cmd 2>&1@", "`>&`"),
            ("cmd <&\"@\"", "`>&`"),
            // bash evaluates these as arithmetic, and runs `$(…)` in a subscript there.
            ("(( @ > 5 ))", "arithmetic"),
            ("if ((x + @)); then ls; fi", "arithmetic"),
            ("echo $[@ + 1]", "arithmetic"),
            ("echo \"$[@]\"", "arithmetic"),
            ("let n=@", "`let`"),
            ("[[ @ -gt 90 ]]", "`[[`"),
            ("declare -i n=@", "`-i`"),
            ("local -ri n=@", "`-i`"),
            // Names of variables: the value would choose one, and its subscript is arithmetic.
            ("read @", "variable's name"),
            ("read -r x @", "variable's name"),
            ("unset @", "variable's name"),
            ("export @=1", "variable's name"),
            ("printf -v @ %s x", "variable's name"),
            ("[ -v @ ]", "variable's name"),
            // A command name the shell expands could be `sh` (`$1sh -c …`, `/bin/s? -c …`).
            ("$1sh -c @", "expands"),
            ("\"$TOOL\" @", "expands"),
            ("/bin/s? -c @", "expands"),
            ("sudo $(which sh) -c @", "expands"),
            // Programs whose arguments are code.
            ("trap @ EXIT", "`trap`"),
            ("sed -i \"s/a/@/\" f", "`sed`"),
            ("awk '/@/' f", "`awk`"),
            ("builtin eval @", "`eval`"),
            ("python3 -c \"print('@')\"", "`python3 -c`"),
            ("perl -e @", "`perl -e`"),
            // The program's option in a cluster, or with its program attached.
            ("perl -ne 'print if /@/' /var/log/syslog", "`perl -e`"),
            ("perl -lne'print \"@\"'", "`perl -e`"),
            ("python3 -Ic \"print('@')\"", "`python3 -c`"),
            ("python3 -c'print(@)'", "`python3 -c`"),
            ("node --eval=\"console.log('@')\"", "`node --eval`"),
            ("node --print @", "`node --print`"),
            ("sudo python3 -Sc @", "`python3 -c`"),
            // Queries: a quote in the value would end the query's string.
            (
                "psql -c \"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '@'\"",
                "`psql -c`",
            ),
            ("psql -Atc \"SELECT '@'\"", ":'v'"),
            ("psql --command=\"DROP ROLE @\"", "`psql --command`"),
            ("mysql -Ne \"KILL @\"", "`mysql -e`"),
            ("mysql --execute \"SELECT '@'\"", "query parameter"),
            (
                "clickhouse-client -q \"SELECT '@'\"",
                "`clickhouse-client -q`",
            ),
            ("mongosh --eval \"db.x.drop('@')\"", "`mongosh --eval`"),
            ("printf -v@ %s x", "variable's name"),
            // Options whose argument is a command the program runs.
            ("flock /tmp/l -c @", "`flock -c`"),
            ("script -qc @ /dev/null", "`script -c`"),
            ("rsync -avze @ src host:dst", "`rsync -e`"),
            ("rsync --rsh=\"ssh -p @\" src host:dst", "`rsync --rsh`"),
            ("tar --to-command=@ -xf f", "`tar --to-command`"),
            ("git -c core.sshCommand=@ pull", "`git -c`"),
            ("scp -o @ f host:", "`scp -o`"),
            // The command after a prefix's options and their arguments, or a runner's `--`.
            ("sudo -u app @", "command name"),
            ("sudo --user app -- @", "command name"),
            ("timeout -s KILL 5 @", "command name"),
            ("xargs -I {} @ {}", "command name"),
            ("env -u HOME @", "command name"),
            ("kubectl exec pod -- @", "command name"),
            ("nsenter -t 1 -m -- @ x", "command name"),
            ("runuser -u app -- @", "command name"),
            ("chroot /host @", "command name"),
            ("docker exec app @", "command name"),
            ("docker exec -u root -e A=1 -it app @ x", "command name"),
            ("podman exec --workdir /srv app @", "command name"),
            ("ip netns exec blue @", "command name"),
            ("echo @ | docker exec -i app sh", "stdin of `sh`"),
            ("chroot /host sh -c @", "`sh`"),
            // A value on the stdin of a command that runs its stdin.
            ("echo @ | sh", "stdin of `sh`"),
            ("echo @ | kubectl exec -i pod -- sh", "stdin of `sh`"),
            (
                "printf '%s\\n' @ | tr a-z A-Z | sudo bash -s",
                "stdin of `bash`",
            ),
            ("echo @ |& python3", "stdin of `python3`"),
            ("cat @ | perl", "stdin of `perl`"),
            ("printf '%s\\n' @ | xargs rm -f", "stdin of `xargs`"),
            ("printf '%s\\n' @ | xargs", "stdin of `xargs`"),
            ("echo @ | psql -d app", "stdin of `psql`"),
            ("echo @ | sqlite3 app.db", "stdin of `sqlite3`"),
            ("python3 <<< @", "stdin of `python3`"),
            ("perl -w < @", "stdin of `perl`"),
            ("echo \"$(echo @ | sh)\"", "stdin of `sh`"),
            ("kubectl exec pod -- sh -c @", "`sh`"),
            ("kubectl exec pod -c app -- sh -c @", "`sh`"),
            ("find /var -exec @ {} +", "find -exec"),
            ("docker exec c /bin/bash -c \"echo @\"", "`bash`"),
            // Right after `$`, the value would be a variable's name or a substitution.
            ("echo \"$@\"", "right after `$`"),
            ("echo $@", "right after `$`"),
            ("echo '$@'", "right after `$`"),
            // dash reads a body's `$(` past the delimiter: where the command goes on is unsure.
            ("cat <<EOF\n$(\nEOF\n )) > @", "here-document whose body"),
            ("cat <<EOF\n`\nEOF\necho @", "here-document whose body"),
        ] {
            let e = holes(src).expect_err(src);
            assert!(e.contains(needle), "{src}: {e}");
        }
        // Near those, what stays fine: subshells, `test`, declarations without `-i`, a
        // script's arguments, a literal basename, a file as a redirection's target.
        for (src, quote) in [
            ("( (echo @) )", Quote::Word),
            ("[ @ -gt 90 ]", Quote::Word),
            ("local n=@", Quote::Word),
            ("export N=\"@\"", Quote::Double),
            ("printf -v x %s @", Quote::Word),
            ("grep -v @ f", Quote::Word),
            ("python3 /opt/fix.py @", Quote::Word),
            ("python3 -c 'import sys' @", Quote::Word),
            ("perl -ne 'print' @", Quote::Word),
            ("psql -h @ -U reflex -c 'SELECT 1'", Quote::Word),
            ("psql -d@ -c 'SELECT 1'", Quote::Word),
            ("psql -v v=@ <<'SQL'\nSELECT :'v'\nSQL", Quote::Word),
            ("mysql -u@ -e 'SELECT 1'", Quote::Word),
            ("psql -c 'SELECT 1' -- @", Quote::Word),
            ("sudo -u @ systemctl restart app", Quote::Word),
            // Values piped or redirected into commands that read them as data.
            ("echo @ | sh -c 'read v; printf %s \"$v\"'", Quote::Word),
            ("echo @ | python3 /opt/parse.py", Quote::Word),
            ("df -P @ | awk 'NR == 2 { print $5 }'", Quote::Word),
            ("echo @ | psql -d app -c 'COPY t FROM STDIN'", Quote::Word),
            ("echo @ | sqlite3 app.db 'SELECT 1'", Quote::Word),
            ("echo @ || sh", Quote::Word),
            ("echo @ && sh", Quote::Word),
            ("grep -c @ f; sh", Quote::Word),
            ("python3 > @", Quote::Word),
            ("python3 /opt/fix.py < @", Quote::Word),
            ("kubectl exec pod -- rm -rf /data/@", Quote::Word),
            ("docker exec app rm -rf /data/@", Quote::Word),
            ("docker exec -e A=@ app ls", Quote::Word),
            ("chroot /host systemctl restart @", Quote::Word),
            ("ip netns exec blue ping -c 1 @", Quote::Word),
            ("docker logs @", Quote::Word),
            ("kubectl exec pod -n @ -- ls", Quote::Word),
            ("rsync -avz @ host:/backup/", Quote::Word),
            ("tar -xzf @ -C /tmp", Quote::Word),
            ("git -C /srv/app checkout @", Quote::Word),
            ("scp -o StrictHostKeyChecking=no @ host:", Quote::Word),
            ("X=@ awk 'BEGIN { print ENVIRON[\"X\"] }'", Quote::Word),
            ("\"$HOME\"/bin/clean @", Quote::Word),
            ("echo $((1 + 2)) @", Quote::Word),
            ("echo \\$@", Quote::Word),
            ("cmd > @ 2>&1", Quote::Word),
            ("cmd 2>&1 > @", Quote::Word),
        ] {
            assert_eq!(one(src).quote, quote, "{src}");
        }
    }

    /// Whether the lexer saw bash arithmetic anywhere in `src` (`@` for holes).
    fn arithmetic(src: &str) -> bool {
        lex(src).unwrap().0.arithmetic()
    }

    #[test]
    fn arithmetic_anywhere_in_the_command_is_known() {
        for src in [
            "v=@; echo $((v + 1))",
            "v=@; if ((v > 5)); then ls; fi",
            "v=@; echo $[v]",
            "v=@; let w=v",
            "v=@; [[ $v -gt 5 ]]",
            "declare -i w; w=@",
            "v=@; a[v]=1",
            "v=@; echo ${a[v]}",
            "v=@; echo ${x:v:1}",
            "echo \"$(echo $((1)))\" @",
            "v=@; echo $(let w=v)",
            "v=@; echo \"$([[ $v -gt 1 ]] && echo big)\"",
        ] {
            assert!(arithmetic(src), "{src}");
        }
        for src in [
            "v=@; echo \"$v\" ${v}",
            "[ @ -gt 5 ]",
            "( (echo @) )",
            "echo '$((1))' @",
        ] {
            assert!(!arithmetic(src), "{src}");
        }
    }

    #[test]
    fn heredocs_end_and_commands_go_on() {
        assert_eq!(one("cat <<EOF\nx\nEOF\necho @").quote, Quote::Word);
        assert_eq!(one("cat <<< @").quote, Quote::Word);
        assert!(holes("cat <<EOF\nx\n").is_err(), "unclosed here-document");
    }

    #[test]
    fn prefixes_move_the_command_position() {
        assert_eq!(one("sudo systemctl restart @").quote, Quote::Word);
        assert_eq!(one("timeout 5 env A=1 ls @").quote, Quote::Word);
        assert_eq!(one("cd /tmp && rm -f @").quote, Quote::Word);
        assert_eq!(one("( ls @ )").quote, Quote::Word);
        assert_eq!(one("echo $(ls) @").quote, Quote::Word);
    }

    #[test]
    fn unterminated_quotes_are_errors() {
        assert!(holes("echo 'x").is_err());
        assert!(holes("echo \"x").is_err());
        assert!(holes("echo $(ls").is_err());
    }

    #[test]
    fn values_are_written_for_their_context() {
        let h = |quote| ShellHole {
            quote,
            option_position: false,
            after_slash: false,
            arithmetic: false,
        };
        assert_eq!(quote("a'b", &h(Quote::Word)), r"'a'\''b'");
        assert_eq!(quote("a'b", &h(Quote::Single)), r"a'\''b");
        assert_eq!(
            quote(r#"$(x)`y`"\"#, &h(Quote::Double)),
            r#"\$(x)\`y\`\"\\"#
        );
    }
}
