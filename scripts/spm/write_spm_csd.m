function write_spm_csd(csd, Hz, out_dir)
% WRITE_SPM_CSD  Write SPM's cross-spectral features at full precision.
%
%   csd_data.txt: one row per element, "frequency i j real imag" (1-based indices, %.17g);
%   Hz.txt: the frequencies. The format of ../shared/spm-reference (tests/conftest.py reads it).
[F, n, ~] = size(csd);
[w, i, j] = ndgrid(1:F, 1:n, 1:n);
rows = [w(:), i(:), j(:), real(csd(:)), imag(csd(:))];
rows = sortrows(rows, [1 2 3]);
fid = fopen(fullfile(out_dir, 'csd_data.txt'), 'w');
fprintf(fid, '%d\t%d\t%d\t%.17g\t%.17g\n', rows');
fclose(fid);
dlmwrite(fullfile(out_dir, 'Hz.txt'), full(Hz(:)), 'precision', '%.17g');
end
