"""The quickstart (`make demo`, `python -m trl_scripts.quickstart`): the run (`run`), CuMo's recipe (`cumo`), the
synthetic data (`make_synthetic_data`, `assets/`) and the `tiny` preset's tokenizer builder (`build_tiny_tokenizer`).

Importing this package imports none of its modules (see `trl_scripts/__init__.py`)."""
