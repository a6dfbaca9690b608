"""Training code and finished stages of the bundled teaching model; not part of the installed ``mmkv`` package."""
