"""placeholder"""
def check_supported(cfg):
    pass
