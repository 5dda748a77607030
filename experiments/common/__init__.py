"""What every experiment script shares: where results go and how a row is written
(results_io), running one case in a child process (child_run), and the paper's setup
(paper_setup). Helpers only; no experiment runs from here."""
