"""The study as resumable steps writing results/<model>/, its figures, its report and the command line."""
