-- Room on each page of social_posts for a new version of every row on it (issue 16, round eleven).
-- reenrich rewrites every row it scores (at least its sentiment_version), and a run rewrites the posts it sees again
-- with new counts. A row's new version that fits on its own page is a HOT update: no index is touched, and the old
-- version is pruned in place. On a full page (fillfactor 100, as a load leaves them) each row moves to another page,
-- and all four indexes of social_posts get a new entry. reenrich rewrites a page's rows in one transaction, whose
-- own old versions cannot be pruned until it commits, so the page must hold two versions of each row: 50.
-- Pages written from now on keep that room; existing ones get it as their rows move (VACUUM FULL social_posts
-- rewrites them at once, under a lock that stops the runs meanwhile).
ALTER TABLE social_posts SET (fillfactor = 50);
