"""Photos in, training examples out: decoding, captions, crops, sampling order and class images."""
