"""Files and arrays in and out: image files (``images``), Zarr / OME-Zarr / lazy TIFF inputs (``zarr_stores``), Zarr
outputs (``zarr_outputs``), arrays already open in this process (``arrays``), atomic writes (``atomic``) and the
guards that keep outputs from destroying inputs (``safety``). Torch-free; import the module you need (nothing is
imported here)."""
