"""Image-quality measures shared by every entry point: Y-PSNR, colour difference, uint8 conversion."""
